"""bond_kernels.integrations.trl.chunked_divergence_loss against TRL's own DistillationTrainer loss
(``trl.trainer.distillation_trainer._chunked_divergence_loss``, its torch path on CPU): the loss, the entropy
sum, the valid count and the student's gradients (hidden, weight, bias) with TRL's conventions (beta 0 / 1 /
in between, temperature, logit scales, softcaps, num_items_in_batch); and patch() routing the trainer's call
to ours."""

import pytest
import torch
from test_integrations_trl_verl import _peer

import bond_kernels.integrations.trl as bk_trl


@pytest.fixture(scope="module")
def trl_distill():
    return _peer("trl.trainer.distillation_trainer")


def _case(b=3, k=7, hs=16, ht=24, v=900, bias=True):
    g = torch.Generator().manual_seed(11)
    s = [torch.randn(b, k, hs, generator=g), torch.randn(v, hs, generator=g) * 0.4]
    t = [torch.randn(b, k, ht, generator=g), torch.randn(v, ht, generator=g) * 0.4]
    biases = (torch.randn(v, generator=g), torch.randn(v, generator=g)) if bias else (None, None)
    mask = (torch.rand(b, k, generator=g) > 0.25).long()
    mask[0] = 0  # a sample with no completion token
    return s, t, biases, mask


def _loss(fn, s, t, biases, mask, **kw):
    h = s[0].clone().requires_grad_(True)
    w = s[1].clone().requires_grad_(True)
    b = None if biases[0] is None else biases[0].clone().requires_grad_(True)
    loss, ent, n = fn(h, t[0], w, t[1], mask, student_lm_head_bias=b, teacher_lm_head_bias=biases[1], **kw)
    loss.backward()
    return loss.detach(), ent.detach(), n, [x.grad for x in (h, w, b) if x is not None]


@pytest.mark.parametrize(
    "kw",
    [
        dict(beta=0.5),
        dict(beta=0.0, temperature=0.7),
        dict(beta=1.0, num_items_in_batch=40),
        dict(beta=0.3, student_logit_scale=0.5, teacher_logit_scale=2.0),
        dict(
            beta=0.5,
            student_final_logit_softcapping=3.0,
            teacher_final_logit_softcapping=5.0,
            temperature=0.9,
        ),
    ],
    ids=["jsd", "forward-kl-T", "reverse-kl-items", "logit-scales", "softcaps"],
)
def test_matches_trl_distillation_loss(trl_distill, kw):
    s, t, biases, mask = _case()
    beta = kw.pop("beta")
    ours = _loss(bk_trl.chunked_divergence_loss, s, t, biases, mask, beta=beta, **kw)
    theirs = _loss(trl_distill._chunked_divergence_loss, s, t, biases, mask, beta=beta, **kw)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert int(ours[2]) == int(theirs[2]) == int(mask.sum())
    for a, b in zip(ours[3], theirs[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_patch_routes_the_trainer_loss(trl_distill):
    original = trl_distill._chunked_divergence_loss
    try:
        names = bk_trl.patch()
        assert "_chunked_divergence_loss" in names
        assert trl_distill._chunked_divergence_loss is bk_trl.chunked_divergence_loss
        s, t, biases, mask = _case()
        # the name the trainer's compute path calls now gives our numbers
        got = _loss(trl_distill._chunked_divergence_loss, s, t, biases, mask, beta=0.5)
        want = _loss(bk_trl.chunked_divergence_loss, s, t, biases, mask, beta=0.5)
        assert torch.equal(got[0], want[0])
    finally:
        bk_trl.unpatch()
    assert trl_distill._chunked_divergence_loss is original


def test_teacher_gets_no_gradient_even_if_it_asks():
    """TRL's teacher parameters may require grad: the loss detaches them (as TRL's gives them none)."""
    s, t, biases, mask = _case(bias=False)
    wt = t[1].clone().requires_grad_(True)
    h = s[0].clone().requires_grad_(True)
    loss, _, _ = bk_trl.chunked_divergence_loss(h, t[0], s[1], wt, mask, 0.5)
    loss.backward()
    assert wt.grad is None and h.grad is not None
