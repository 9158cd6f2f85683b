"""The CPU memory meter: live storages counted once, freed ones taken off, views not double counted."""
import torch

from nest_ssl.memory import PeakMemory, SavedActivations, tensor_bytes


def test_peak_counts_live_storages_once():
    w = torch.randn(100, 100, requires_grad=True)  # made outside: not counted
    with PeakMemory() as m:
        x = torch.randn(100, 100)  # 40 000 B
        v = x.view(-1)  # a view: same storage
        y = x * 2  # 40 000 B
        del y
        z = x + 1  # 40 000 B: peak stays at two live tensors
    assert m.peak == 80_000 and m.live == 80_000
    del v, z, x
    assert m.live == 0
    assert tensor_bytes([w, w.view(-1), None]) == 40_000


def test_saved_activations_counts_what_backward_keeps():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedActivations(lin) as s:
        y = torch.tanh(lin(x))  # linear saves x and its weight (a parameter: left out); tanh saves its output
    assert s.bytes == 2 * 8 * 64 * 4
    with SavedActivations() as s:
        torch.tanh(lin(x))
    assert s.bytes == 2 * 8 * 64 * 4 + 64 * 64 * 4
    y.sum().backward()
