"""edgeq.train: a model with depthwise convolutions trains and is evaluated in channels-last memory."""

import numpy as np
import torch
from torch import nn

from edgeq.data import Arrays
from edgeq.recipe import Finetune
from edgeq.train import fast_layout, fit, predict_logits


class Depthwise(nn.Module):
    """A depthwise-separable block and a head; `view` (needs contiguous memory) where asked; counts its forwards."""

    def __init__(self, view: bool = False):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8 if view else 8, 3)
        self.view = view
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.layouts: list[bool] = []

    def forward(self, x):
        self.calls += 1
        y = torch.relu(self.bn(self.pw(self.dw(x))))
        self.layouts.append(y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous())
        return self.head(y.view(len(y), -1) if self.view else y.mean((2, 3)))


def data(n: int = 64) -> Arrays:
    rng = np.random.default_rng(0)
    return Arrays(rng.normal(size=(n, 4, 8, 8)).astype(np.float32), rng.integers(0, 3, n))


def test_a_depthwise_model_runs_channels_last_inside_and_is_given_back_as_it_was():
    torch.manual_seed(0)
    model, x = Depthwise().eval(), data().x
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        usual = model(torch.from_numpy(x.copy())).numpy()
    model.layouts.clear()
    got = predict_logits(model, x)
    assert model.layouts and all(model.layouts)  # every forward ran channels-last
    np.testing.assert_allclose(got, usual, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != "calls")


def test_a_model_that_cannot_run_channels_last_runs_as_before_and_the_probe_touches_nothing():
    torch.manual_seed(0)
    model, x = Depthwise(view=True).eval(), data().x
    with torch.inference_mode():
        usual = model(torch.from_numpy(x.copy())).numpy()
    model.layouts.clear()
    with fast_layout(model, x[:2]):
        assert int(model.calls) == 1  # the probe ran on copies of the buffers
        assert all(p.is_contiguous() for p in model.parameters())
    model.layouts.clear()
    assert np.array_equal(predict_logits(model, x), usual)
    assert model.layouts[-1] is False  # the forward that gave them (the probe's, on copies, is the one before)


def test_a_fine_tune_trains_channels_last_and_returns_the_usual_layout():
    torch.manual_seed(0)
    model = Depthwise()
    trained = fit(model, data(), Finetune(epochs=1, batch_size=16, lr=1e-2), progress=False)
    assert trained.layouts and all(trained.layouts[-4:])  # the training steps
    assert all(p.is_contiguous() for p in trained.parameters())
    assert not torch.equal(trained.pw.weight, model.pw.weight)  # it trained (a copy: the model is unchanged)
