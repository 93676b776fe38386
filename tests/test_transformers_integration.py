"""bond_kernels.integrations.transformers.sequence_logprobs on tiny models built from configs (offline).

Oracle: ``log_softmax(model(...).logits)`` gathered at the shifted labels, values and gradients with respect
to every model parameter under a random upstream gradient.  Llama (untied head, here with a bias added),
Qwen2 (tied embeddings: the head's gradient lands on the embedding), Gemma-2 (tied, final-logit softcap),
and the other final-logit transforms a config announces: Cohere (× logit_scale), Granite (÷ logits_scaling),
HyperCLOVAX (× logits_scaling), Falcon-H1 (× lm_head_multiplier), RecurrentGemma (logits_soft_cap).  Then
the one-time check against the model's own forward: it catches transforms no config announces.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bond_kernels.integrations.transformers import SequenceLogprobs, sequence_logprobs  # noqa: E402

# V = 301 (odd, not a power of two); tiles of 5 rows × 64 columns split it into 5 tiles, the last partial.
VOCAB = 301
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _llama():
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    # A head with a bias (Llama has none): the bias path of the fused head, checked against the model itself.
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.normal_(0, 0.5)
    m.lm_head = head
    return m


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))


def _gemma2():
    cfg = transformers.Gemma2Config(
        **COMMON,
        head_dim=8,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
        tie_word_embeddings=True,
    )
    return transformers.Gemma2ForCausalLM(cfg)


def _cohere():
    # logit_scale far from 1 (Command-R uses 0.0625): a missed scale changes every log-prob.
    return transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.3))


def _granite():
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0))


def _hyperclovax():
    # The same field name as Granite's, the opposite operation (×).
    return transformers.HyperCLOVAXForCausalLM(transformers.HyperCLOVAXConfig(**COMMON, logits_scaling=0.5))


def _falcon_h1():
    cfg = transformers.FalconH1Config(
        **COMMON,
        head_dim=8,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=4,
        lm_head_multiplier=0.25,
        eos_token_id=2,  # the default (255001) lies outside this vocabulary
    )
    return transformers.FalconH1ForCausalLM(cfg)


def _recurrent_gemma():
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        lru_width=32,
        attention_window_size=8,
        logits_soft_cap=4.0,
    )
    return transformers.RecurrentGemmaForCausalLM(cfg)


MODELS = {
    "llama+bias": _llama,
    "qwen2-tied": _qwen2,
    "gemma2-softcap": _gemma2,
    "cohere-logit_scale": _cohere,
    "granite-logits_scaling": _granite,
    "hyperclovax-logits_scaling": _hyperclovax,
    "falcon_h1-lm_head_multiplier": _falcon_h1,
    "recurrent_gemma-logits_soft_cap": _recurrent_gemma,
}


def _batch(gen):
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not scored
    return ids, mask, labels


def _oracle(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    y = labels[:, 1:]
    keep = y != -100
    tok = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    return tok, tok.sum(-1)


# "5,64": 24 rows in row blocks of 5 (every tile recomputed); "64,16": one row block in 16-column tiles, the
# last 10 of 19 kept by the forward in the grad_weight buffer (recompute="auto").
@pytest.mark.parametrize("tile", ["5,64", "64,16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_full_logits(name, tile, monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    torch.manual_seed(0)
    model = MODELS[name]().float()
    gen = torch.Generator().manual_seed(1)
    ids, mask, labels = _batch(gen)
    g_tok = torch.randn(3, 8, generator=gen)
    g_seq = torch.randn(3, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]

    want_tok, want_seq = _oracle(model, ids, mask, labels)
    want = torch.autograd.grad((want_tok * g_tok).sum() + (want_seq * g_seq).sum(), params)

    out = sequence_logprobs(model, ids, mask, labels)
    assert isinstance(out, SequenceLogprobs)
    assert out.token_logprobs.shape == (3, 8) and out.token_logprobs.dtype == torch.float32
    assert out.sequence_logprobs.shape == (3,) and out.sequence_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.token_logprobs, want_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sequence_logprobs, want_seq, rtol=1e-5, atol=1e-5)
    assert (out.token_logprobs[labels[:, 1:] == -100] == 0).all()
    got = torch.autograd.grad(
        (out.token_logprobs * g_tok).sum() + (out.sequence_logprobs * g_seq).sum(), params
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_never_forms_full_logits(monkeypatch):
    """The model's own forward (which builds the logits) runs once, for the check, on at most 8 tokens of
    one row, and never again for that model; with verify=False never.  No tile exceeds the plan."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "4,32")
    torch.manual_seed(0)
    from bond_kernels.ops import linear_engine as eng

    seen = []
    real = eng._tile_logits

    def spy(h_rows, weight, bias, v0, v1, plan, out=None):
        x = real(h_rows, weight, bias, v0, v1, plan, out=out)
        seen.append(tuple(x.shape))
        return x

    monkeypatch.setattr(eng, "_tile_logits", spy)
    forwards = []
    real_forward = transformers.Qwen2ForCausalLM.forward

    def counted(self, input_ids=None, **kw):
        forwards.append(tuple(input_ids.shape))
        return real_forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "forward", counted)
    ids, mask, labels = _batch(torch.Generator().manual_seed(2))
    model = _qwen2()
    for _ in range(3):
        out = sequence_logprobs(model, ids, mask, labels, backend="cpu")
        out.sequence_logprobs.sum().backward()
    assert forwards == [(1, 8)]
    assert seen and max(r for r, _ in seen) <= 4 and max(c for _, c in seen) <= 32
    sequence_logprobs(_qwen2(), ids, mask, labels, backend="cpu", verify=False)
    assert forwards == [(1, 8)]


class _ScaledLlama(transformers.LlamaForCausalLM):
    """A model class that post-processes its logits with no config field saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.25
        return out


class _ShiftedHiddenLlama(transformers.LlamaForCausalLM):
    """A model class that changes the hidden states between the backbone and lm_head."""

    def forward(self, input_ids=None, **kwargs):
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden * 0.5))


class _SlicedLlama(transformers.LlamaForCausalLM):
    """A model class that drops padded vocabulary columns from its logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[..., : VOCAB - 3]
        return out


class _LoraHead(torch.nn.Module):
    """PEFT's layout of a LoRA adapter on lm_head: ``.weight`` is the base weight, forward adds B·A·x."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 4, bias=False)
        self.lora_B = torch.nn.Linear(4, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _LoraHeadLlama(transformers.LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = _LoraHead(self.lm_head)


@pytest.mark.parametrize(
    "cls, needle",
    [
        (_ScaledLlama, "post-processes its logits"),
        (_ShiftedHiddenLlama, "transforms the backbone's hidden states"),
        (_SlicedLlama, "returns logits of shape"),
        (_LoraHeadLlama, "LoRA adapter on lm_head"),
    ],
)
def test_the_check_catches_what_no_config_announces(cls, needle):
    torch.manual_seed(0)
    model = cls(transformers.LlamaConfig(**COMMON))
    model.train()
    ids, mask, labels = _batch(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=needle) as info:
        sequence_logprobs(model, ids, mask, labels)
    assert "verify=False" in str(info.value)
    assert model.training and all(m.training for m in model.modules())  # the check restored the mode
    # Still unverified: the next call checks (and raises) again; verify=False runs the fused head as asked.
    with pytest.raises(ValueError, match=needle):
        sequence_logprobs(model, ids, mask, labels)
    out = sequence_logprobs(model, ids, mask, labels, verify=False)
    assert torch.isfinite(out.sequence_logprobs).all()


def test_the_check_reports_a_forward_that_fails():
    class Broken(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            raise KeyError("pixel_values")

    model = Broken(transformers.LlamaConfig(**COMMON))
    ids, mask, labels = _batch(torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="one-time check.*KeyError.*verify=False"):
        sequence_logprobs(model, ids, mask, labels)


def test_labels_default_to_input_ids_under_the_mask():
    torch.manual_seed(0)
    model = _llama()
    ids, mask, _ = _batch(torch.Generator().manual_seed(3))
    a = sequence_logprobs(model, ids, mask)
    b = sequence_logprobs(model, ids, mask, ids.masked_fill(mask == 0, -100))
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs)


def test_labels_none_gives_the_same_sums_for_left_and_right_padding():
    """The first real token of a left-padded row has only a pad before it: labels=None does not score it,
    so the sums match the right-padded batch (positions passed as generation does)."""
    torch.manual_seed(0)
    model = _llama()
    g = torch.Generator().manual_seed(6)
    lengths = [9, 6, 4]
    tokens = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    right = torch.zeros(3, 9, dtype=torch.long)
    left = torch.zeros(3, 9, dtype=torch.long)
    right_mask, left_mask = torch.zeros_like(right), torch.zeros_like(left)
    for i, t in enumerate(tokens):
        right[i, : len(t)], right_mask[i, : len(t)] = t, 1
        left[i, 9 - len(t) :], left_mask[i, 9 - len(t) :] = t, 1
    pos_left = (left_mask.cumsum(-1) - 1).clamp_min(0)
    a = sequence_logprobs(model, right, right_mask)
    b = sequence_logprobs(model, left, left_mask, position_ids=pos_left)
    torch.testing.assert_close(a.sequence_logprobs, b.sequence_logprobs, rtol=1e-5, atol=1e-5)
    assert (a.token_logprobs != 0).sum(-1).tolist() == [n - 1 for n in lengths]


def test_bad_input():
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        sequence_logprobs(model, ids, None, ids[:, 1:])
    with pytest.raises(ValueError, match="input_ids must be a"):
        sequence_logprobs(model, ids[0], None)
    with pytest.raises(ValueError, match="at least 2 positions"):
        sequence_logprobs(model, ids[:, :1], None)
    with pytest.raises(TypeError, match="backbone"):
        sequence_logprobs(torch.nn.Linear(3, 3), ids, None)
    # Caught here, not deep inside the model (embedding RuntimeError / IndexError, reshape errors).
    with pytest.raises(ValueError, match="input_ids must be a .* integer tensor.*float32"):
        sequence_logprobs(model, ids.float(), None)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 5\)"):
        sequence_logprobs(model, ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\).*got {VOCAB + 4}"):
        sequence_logprobs(model, ids.clone().fill_(VOCAB + 4), None)
    with pytest.raises(ValueError, match="at least one sequence"):
        sequence_logprobs(model, ids[:0], None)
    with pytest.raises(TypeError, match="verify must be a bool"):
        sequence_logprobs(model, ids, None, verify="no")
    with pytest.raises(ValueError, match="recompute must be 'auto' or 'full', got 'some'"):
        sequence_logprobs(model, ids, None, recompute="some")


# ----------------------------------------------------------------------------------------------------
# Wrappers: the fused head runs through the outermost wrapper's forward (in-process here; DDP and FSDP2 on
# two gloo processes in tests/test_distributed_training.py).
# ----------------------------------------------------------------------------------------------------
class _LoraLinear(torch.nn.Module):
    """PEFT's LoRA layer layout: the frozen base layer plus B·A·x."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, 4, bias=False)
        self.lora_B = torch.nn.Linear(4, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _LoraModel(torch.nn.Module):
    """PEFT's LoraModel: holds the transformers model as ``.model`` and calls ``self.model.forward``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.forward(*args, **kwargs)


class _PeftModel(torch.nn.Module):
    """The structure of peft's PeftModelForCausalLM (peft is not installed here): ``base_model`` (a
    LoraModel), ``peft_config``, ``get_base_model()``, and a forward spelling out a causal LM's keywords."""

    calls = 0

    def __init__(self, model, prompt_learning=False):
        super().__init__()
        for layer in model.model.layers:
            layer.self_attn.q_proj = _LoraLinear(layer.self_attn.q_proj)
            layer.self_attn.v_proj = _LoraLinear(layer.self_attn.v_proj)
        self.base_model = _LoraModel(model)
        self.peft_config = {"default": None}
        self.active_peft_config = type("PromptTuningConfig", (), {"is_prompt_learning": prompt_learning})()

    def get_base_model(self):
        return self.base_model.model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        type(self).calls += 1
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )


def _compare_through(wrapper, oracle_model, ids, mask, labels, gen):
    """sequence_logprobs(wrapper) against the oracle model's own logits: values and every gradient."""
    g_tok, g_seq = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    params = [p for p in oracle_model.parameters() if p.requires_grad]
    want_tok, want_seq = _oracle(oracle_model, ids, mask, labels)
    want = torch.autograd.grad((want_tok * g_tok).sum() + (want_seq * g_seq).sum(), params)
    out = sequence_logprobs(wrapper, ids, mask, labels)
    assert isinstance(out, SequenceLogprobs)
    torch.testing.assert_close(out.token_logprobs, want_tok, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(
        (out.token_logprobs * g_tok).sum() + (out.sequence_logprobs * g_seq).sum(), params
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return out


def test_through_a_peft_wrapper():
    torch.manual_seed(0)
    peft = _PeftModel(transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)))
    gen = torch.Generator().manual_seed(7)
    ids, mask, labels = _batch(gen)
    inner = peft.get_base_model()
    before = _PeftModel.calls
    _compare_through(peft, inner, ids, mask, labels, gen)
    assert _PeftModel.calls == before + 1  # the wrapper's forward ran (once: the check calls the inner model)
    assert "forward" not in inner.__dict__  # the instance-level forward is gone again
    assert not any(p.requires_grad for n, p in inner.named_parameters() if "base_layer" in n)
    with pytest.raises(TypeError, match="prompt-learning adapter.*LoRA"):
        sequence_logprobs(_PeftModel(_llama(), prompt_learning=True), ids, mask, labels)


def test_through_real_peft_lora():
    """peft itself (pinned in tests/requirements-peers.txt): LoRA on the attention and the MLP runs through
    PeftModel's forward with every adapter gradient right; a LoRA adapter on lm_head (an extra term the fused
    head would miss) is refused by the one-time check instead of giving wrong log-probs."""
    peft = pytest.importorskip("peft")  # installed by `make setup` on CPython 3.11/3.12, as trl and verl are
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(_llama(), lora)
    gen = torch.Generator().manual_seed(11)
    ids, mask, labels = _batch(gen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _compare_through(model, model, ids, mask, labels, gen)  # the oracle: PeftModel's own logits
    assert "forward" not in model.get_base_model().__dict__
    on_head = peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    with pytest.raises(ValueError, match="lm_head"):
        sequence_logprobs(peft.get_peft_model(_llama(), on_head), ids, mask, labels)


def test_through_torch_compile():
    """The compiled module traces the inner model's patched forward: backbone and our op in its graph."""
    torch.manual_seed(0)
    model = _qwen2()  # tied embeddings: the compiled head's gradient lands on the embedding
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(8)
    ids, mask, labels = _batch(gen)
    _compare_through(compiled, model, ids, mask, labels, gen)
    assert any("bond_kernels" in str(n.target) for gm in graphs for n in gm.graph.nodes), "our op not traced"
    assert "forward" not in model.__dict__


def test_wrapper_forward_is_restored():
    """An instance-level forward the caller installed (accelerate's autocast wrapper does) is put back, also
    when the call fails; unsupported wrappers are named."""
    model = _llama()
    own = model.forward
    model.forward = own
    ids, mask, labels = _batch(torch.Generator().manual_seed(9))
    sequence_logprobs(model, ids, mask, labels)
    assert model.__dict__["forward"] is own
    with pytest.raises(ValueError, match="integer tensor"):
        sequence_logprobs(model, ids.float(), mask)
    with pytest.raises(ValueError, match="recompute"):
        sequence_logprobs(model, ids, mask, recompute="some")  # raised inside the forward
    assert model.__dict__["forward"] is own
    plain = _llama()
    with pytest.raises(ValueError, match="recompute"):
        sequence_logprobs(plain, ids, mask, recompute="some")
    assert "forward" not in plain.__dict__
    with pytest.raises(TypeError, match="DataParallel is not supported: use DistributedDataParallel"):
        sequence_logprobs(torch.nn.DataParallel(_llama()), ids, mask)
