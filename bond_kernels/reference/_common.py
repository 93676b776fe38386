import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the reference never computes in bf16/fp16."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reward_compare_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype in which rewards ``a`` and ``b`` compare exactly: the promotion of two float dtypes (it holds
    both), fp64 when either is an integer (exact below 2^53; fp32 would round 2^24 + 1 onto 2^24)."""
    if a.is_floating_point() and b.is_floating_point():
        return torch.promote_types(a.dtype, b.dtype)
    return torch.float64


def transform_logits(x: torch.Tensor, temperature: float, softcap) -> torch.Tensor:
    """z = softcap·tanh(x / softcap) / temperature (softcap first, Gemma-2 style; None or 0 disables it).

    With a softcap, a -inf logit (a masked vocabulary entry) becomes -softcap: finite, so it keeps a small
    probability, exactly as the model's own capped logits do (Gemma-2 applies the cap to every entry).  Mask
    after the cap if masked entries must stay impossible.  Every backend follows this.
    """
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    if temperature != 1.0:
        x = x / temperature
    return x


def shifted_logits(x: torch.Tensor, temperature: float, softcap) -> torch.Tensor:
    """``z − max_v z`` per row for ``z = transform_logits(x)``, without rounding ``|z|`` first.

    Log-probs and entropies depend on ``z`` only through these differences.  The capped logits
    ``w = softcap·tanh(x/softcap)`` (or ``x``) are shifted by their row maximum *before* the division by the
    temperature, as the kernels do: ``(w − max w) / T`` is exact to the rounding of the difference, while
    ``w/T − max(w/T)`` carries one rounding of ``|w|/T`` (2.4e-4 at |z| = 4000 in fp32) and overflows for
    ``|w|/T`` above 3.4e38 (README, "Odd inputs").  The maximum is a constant for autograd (the log-softmax
    does not depend on it).  A row of all -inf (no softcap) gives NaN, as does a NaN or +inf entry.
    """
    if softcap:
        x = _Softcap.apply(x, softcap)
    t = x - x.amax(-1, keepdim=True).detach()
    if temperature != 1.0:
        t = t / temperature
    return t


class _Softcap(torch.autograd.Function):
    """``c·tanh(x/c)`` whose backward is ``grad·(1 − tanh²(x/c))`` directly.  Autograd's chain rule through
    the product and the division, ``(grad·c)·sech²·(1/c)``, underflows to 0 in fp32 once ``grad·c`` is below
    1e-45 (softcap 2^-126 at temperature 1e30 lost a gradient of 3e-31).  The backward is itself made of
    differentiable ops, so higher derivatives still work."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(x)
        ctx.c = c
        return c * torch.tanh(x / c)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a = torch.tanh(x / ctx.c).abs()
        return grad * ((1 - a) * (1 + a)), None
