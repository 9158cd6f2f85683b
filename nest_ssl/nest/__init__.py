"""NEST (NeMo's `EncDecDenoiseMaskedTokenPredModel`): random-projection quantizer targets, block masking, the
multi-softmax decoder, the masked-token loss and the model that joins them to the Conformer encoder."""
