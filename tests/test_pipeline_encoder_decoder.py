"""Issue 14.6: encoder-decoder models in a pipeline, and stages set up without running them.

Stages used to learn their microbatch shapes from torch's dynamic metadata inference, which runs
every stage once more on the first step, later stages on uninitialized tensors: integer ids crossing
a cut (T5's and BART's decoder_input_ids) indexed garbage, buffers were updated twice (BatchNorm's
running statistics), and nn.Transformer's strided input gradient became a strided receive buffer
that gloo's irecv refused ("input tensor has to be contiguous"). Stages now get static metadata from
a FakeTensor run and send contiguous gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from torch._subclasses.fake_tensor import FakeTensor
from fxpar.testing import rank_pool

transformers = pytest.importorskip("transformers")


def _t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=4, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


def _bart():
    cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, use_cache=False, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                                dropout=0.0, batch_first=True)

    def forward(self, src, tgt):
        return self.t(src, tgt)


def _ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _step(name: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    if name == "nn.Transformer":
        model = _Transformer().double().eval()
        args = (torch.randn(4, 6, 16, dtype=torch.float64), torch.randn(4, 5, 16, dtype=torch.float64))
        kwargs, target, loss_fn = {}, torch.randn(4, 5, 16, dtype=torch.float64), _mse
    else:
        model = (_t5() if name == "t5" else _bart()).double().eval()
        args = (torch.randint(3, 64, (4, 6)),)
        kwargs = {"decoder_input_ids": torch.randint(3, 64, (4, 5))}
        target, loss_fn = torch.randint(3, 64, (4, 5)), _ce
    # cut at the decoder: its ids (an integer input) cross the cut
    cut = {"t5": "decoder", "bart": "model.decoder", "nn.Transformer": "t.decoder"}[name]
    pm = fxpar.parallelize(model, mesh, example_inputs=args, example_kwargs=kwargs, plan=fxpar.Plan(pp=[cut]))
    # the dtypes crossing into stage 1 (integer ids: the case torch.empty cannot stand in for)
    stage1 = pm.graph_module.get_submodule("stage_1")
    crossing = sorted({str(n.meta["val"].dtype) for n in stage1.graph.nodes if n.op == "placeholder"})
    calls = []
    for gm in pm.stage_modules:  # real runs only (the metadata run is on FakeTensors)
        gm.register_forward_pre_hook(lambda _, a: calls.append(not any(isinstance(x, FakeTensor) for x in a)))
    loss = pm.step(*args, target=target, loss_fn=loss_fn, **kwargs)
    ref = copy.deepcopy(model)
    ref_loss = loss_fn(ref(*args, **kwargs), target)
    ref_loss.backward()
    grads = pm.full_grads()
    errs = {}
    for k, p in ref.named_parameters():
        if p.grad is None or p.grad.abs().max() == 0:
            continue
        scale = max(p.grad.abs().max().item(), 1e-3 * ref_grad_max(ref))  # some biases get ~0 gradients
        errs[k] = (grads[k] - p.grad).abs().max().item() / scale
    return {"loss_err": abs(loss.item() - ref_loss.item()) / ref_loss.item(), "errs": errs,
            "calls": sum(calls), "microbatches": pm.split.microbatches, "crossing": crossing}


def ref_grad_max(model: nn.Module) -> float:
    return max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["t5", "bart", "nn.Transformer"])
def test_encoder_decoder_pp2_gradients_equal_the_unsplit_model(name):
    results = rank_pool(2).run(_step, name, timeout=120)
    for r in results:
        assert r["loss_err"] < 1e-12, r
        worst = max(r["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-10, worst
        # each local stage runs once per microbatch: no extra run to infer shapes
        assert r["calls"] == r["microbatches"], r
    if name != "nn.Transformer":
        assert "torch.int64" in results[0]["crossing"], results[0]["crossing"]
