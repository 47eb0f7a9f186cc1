"""The throughput changes of fcdistill/train/throughput.py compute what they replace.

A small randomly initialised llama (grouped key/value heads, as SmolLM2 and Qwen have) runs a
packed row three ways: transformers' SDPA with its block-diagonal mask, our per-example SDPA, and
each example alone; in bf16 the per-example matmul attention is SDPA to bf16 rounding. TRL's fused
LM head, made compact on CPU, gives the loss and gradients of the plain cross-entropy over full
logits, and the dense CPU head gives TRL's tiled head's values and gradients (the FC rows' alone
when they are marked). LoRA in bf16 keeps fp32 parameters and PEFT's results to bf16 rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcdistill.train.throughput import PACKED_SDPA, packed_sdpa_forward, register_packed_sdpa, score_only_labelled_positions

LENGTHS = [37, 90, 5, 61]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def _load(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn).train()


def _packed_row() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (1, sum(LENGTHS)))
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return ids, pos


def test_packed_sdpa_matches_masked_sdpa_and_each_example_alone(llama_dir):
    ids, pos = _packed_row()
    name = register_packed_sdpa()
    outs, grads = {}, {}
    for attn in ("sdpa", name):
        model = _load(llama_dir, attn)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.pow(2).mean().backward()
        outs[attn] = logits.detach()
        grads[attn] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert torch.allclose(outs["sdpa"], outs[name], atol=1e-5)
    assert torch.allclose(grads["sdpa"], grads[name], atol=1e-6, rtol=1e-4)

    model = _load(llama_dir, name).eval()
    start = 0
    with torch.no_grad():
        for n in LENGTHS:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
            assert torch.allclose(outs[name][:, start:start + n], alone, atol=1e-5), (start, n)
            start += n
    # the check can fail: the same row without restarting positions attends across examples
    with torch.no_grad():
        unpacked = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(unpacked[:, LENGTHS[0]:], outs[name][:, LENGTHS[0]:], atol=1e-3)


def test_padded_batches_and_generation_take_transformers_sdpa(llama_dir):
    """No packed row (a padding mask, a batch of two, a cache): the result is transformers' SDPA."""
    register_packed_sdpa()
    ours, theirs = _load(llama_dir, PACKED_SDPA).eval(), _load(llama_dir, "sdpa").eval()
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
    with torch.no_grad():
        gen_ours = ours.generate(ids[:1], max_new_tokens=5, do_sample=False)
        gen_theirs = theirs.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_ours, gen_theirs)


def test_one_segment_falls_back_without_error():
    """A row holding one example is plain causal attention."""
    class Module:
        num_key_value_groups = 2
        is_causal = True

    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    out, _ = packed_sdpa_forward(Module(), q, k, v, None, position_ids=torch.arange(12).unsqueeze(0))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def test_compact_lm_head_gives_the_plain_loss_and_gradients(llama_dir):
    """TRL's fused head scoring only labelled positions on CPU == cross-entropy over full logits."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    assert score_only_labelled_positions() is True
    assert trl_utils._use_triton(torch.device("cpu")) is True  # TRL still decides compaction by this name
    ids, pos = _packed_row()
    labels = ids.clone()
    labels[:, :50] = -100  # a prompt: no loss there
    labels[:, 100:120] = -100
    results = []
    for fused in (False, True):
        model = _load(llama_dir, "sdpa")
        if fused:
            add_fused_lm_head(model)
            out = model(input_ids=ids, position_ids=pos, labels=labels, fused_lm_head=True, use_cache=False)
        else:
            out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), model.model.layers[1].mlp.down_proj.weight.grad.clone(),
                        model.lm_head.weight.grad.clone()))
    (loss_a, grad_a, head_a), (loss_b, grad_b, head_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5), (loss_a, loss_b)
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-4)
    assert torch.allclose(head_a, head_b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_copy_free_trainable_tokens_give_peft_values_and_gradients(tmp_path, tied):
    """The FC row trained without copying the matrix: the same logits, loss and gradients (the row's
    and the LoRA weights') as PEFT's index_copy path, through the model's forward and through the LM
    head's `weight` as TRL's fused head reads it; the head's weight is the base matrix, not a copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fcdistill.train.sft import fit_trainable_tokens_to_fused_lm_head
    from fcdistill.train.throughput import trainable_tokens_without_copies

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    fc = 299
    ids = torch.tensor([[5, fc, 17, 42, fc, 8, 99, fc]])

    def run(copy_free: bool):
        torch.manual_seed(1)  # the same LoRA initialisation and perturbation both times
        base = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
        indices = [fc] if tied else {"model.embed_tokens": [fc], "lm_head": [fc]}
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                trainable_token_indices=indices))
        fit_trainable_tokens_to_fused_lm_head(model)
        with torch.no_grad():  # a trained-looking row, not the initial copy of the base row
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn_like(p))
                elif "lora_B" in name:
                    p.normal_(0, 0.1)
        if copy_free:
            assert trainable_tokens_without_copies(model) == 2
        logits = model(input_ids=ids).logits
        head = model.get_output_embeddings()
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        fused = torch.nn.functional.linear(hidden, head.weight)  # what TRL's fused head computes with
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]) + fused[0, :, fc].sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        base_weight = head.token_adapter.base_layer.weight
        return logits.detach(), loss.item(), grads, head.weight.data_ptr() == base_weight.data_ptr()

    ref_logits, ref_loss, ref_grads, ref_shared = run(False)
    logits, loss, grads, shared = run(True)
    assert not ref_shared and shared  # PEFT hands the head a copy; the patched head reads the base matrix
    assert torch.allclose(logits, ref_logits, atol=1e-6) and abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("trainable_tokens_delta" in n for n in grads)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(g, ref_grads[name], atol=1e-6, rtol=1e-4), name


def test_low_precision_packed_attention_is_each_example_alone():
    """bf16 packed rows attend by matmuls and an fp32 softmax: each example's output is SDPA's on that
    example alone (to bf16 rounding), and the grouped heads are the right ones."""
    import fcdistill.train.throughput as throughput
    from fcdistill.train.throughput import grouped_causal_attention

    class Module:
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(2)
    lengths = [23, 57, 9]
    n = sum(lengths)
    q, k, v = torch.randn(1, 6, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    pos = torch.cat([torch.arange(m) for m in lengths]).unsqueeze(0)
    ref, start = [], 0
    for m in lengths:
        sl = slice(start, start + m)
        ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                                                    is_causal=True, enable_gqa=True))
        start += m
    ref = torch.cat(ref, dim=2).transpose(1, 2)
    # the function itself, in fp32, is SDPA exactly
    assert torch.allclose(grouped_causal_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], 0.25), ref[:, :23].transpose(1, 2),
                          atol=1e-5)
    assert throughput.LOW_PRECISION_MATMUL_ATTENTION
    out, _ = packed_sdpa_forward(Module(), q.bfloat16(), k.bfloat16(), v.bfloat16(), None, position_ids=pos)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 3e-2
    # it can fail: keys and values repeated in the other order (heads 0,2,4 on the first key/value head)
    wrong = torch.nn.functional.scaled_dot_product_attention(q[:, :, :23], k[:, :, :23].repeat(1, 3, 1, 1),
                                                             v[:, :, :23].repeat(1, 3, 1, 1), is_causal=True)
    assert (out[:, :23].float() - wrong.transpose(1, 2)).abs().max() > 0.1


@pytest.mark.parametrize("temperature,softcap,logit_scale", [(1.0, None, 1.0), (0.7, 5.0, 1.5)],
                         ids=["plain", "temperature-softcap-scale"])
def test_dense_cpu_lm_head_gives_trl_s_values_and_gradients(temperature, softcap, logit_scale):
    """The dense CPU head == TRL's tiled ChunkedLogProbFunction: log-probs, the four optional outputs,
    and the gradients of the hidden states and of the weight, with TRL's logit transforms too; and
    TRL still calls its kernel by the name the patch replaces."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction

    from fcdistill.train.throughput import _dense_log_probs, dense_cpu_lm_head

    assert dense_cpu_lm_head() is True and trl_utils._ChunkedLogProbFunction._fcd_dense
    torch.manual_seed(3)
    hidden = torch.randn(37, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_(True)
    targets = torch.randint(0, 300, (37,))
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    args = (targets, temperature, 64, softcap, logit_scale, outputs)
    theirs = ChunkedLogProbFunction.apply(hidden, weight, None, *args)
    ours = _dense_log_probs(ChunkedLogProbFunction, hidden, weight, None, *args)
    for name, a, b in zip(("log_probs", *outputs), theirs, ours):
        assert a is not None and b is not None, name
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    grads = []
    for logp in (theirs[0], ours[0]):
        hidden.grad = weight.grad = None
        (logp * torch.linspace(-1, 2, 37)).sum().backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
    # bf16 hidden states over a bf16 matrix, as on a bf16 base: TRL's values to bf16 rounding
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    a = ChunkedLogProbFunction.apply(h16, w16, None, *args)[0]
    b = _dense_log_probs(ChunkedLogProbFunction, h16, w16, None, *args)[0]
    assert (a.float() - b.float()).abs().max() < 2e-2


def test_dense_cpu_lm_head_trains_only_the_marked_rows():
    """A head weight carrying `fcd_trained_rows` (the FC token's rows written into a frozen matrix):
    the rows get exactly their slice of the whole-matrix gradient, and the hidden states theirs."""
    from trl.kernels import ChunkedLogProbFunction

    from fcdistill.train.throughput import _dense_log_probs

    torch.manual_seed(4)
    base = torch.randn(300, 32) * 0.3
    index = torch.tensor([7, 299])
    rows = (torch.randn(2, 32) * 0.3).requires_grad_(True)
    base.index_copy_(0, index, rows.detach())
    hidden = torch.randn(41, 32, requires_grad=True)
    targets = torch.randint(0, 300, (41,))
    targets[:5] = 299  # the trained row is a target too
    full = base.clone().requires_grad_(True)
    ChunkedLogProbFunction.apply(hidden, full, None, targets, 1.0, 64, None, 1.0, ())[0].sum().backward()
    ref_rows, ref_hidden = full.grad[index].clone(), hidden.grad.clone()
    hidden.grad = None
    marked = base.view_as(base)
    marked.fcd_trained_rows = (index, rows)
    logp = _dense_log_probs(ChunkedLogProbFunction, hidden, marked, None, targets, 1.0, 64, None, 1.0, ())[0]
    logp.sum().backward()
    assert torch.allclose(rows.grad, ref_rows, atol=1e-5)
    assert torch.allclose(hidden.grad, ref_hidden, atol=1e-5)
    assert ref_rows.abs().sum() > 0


def test_lora_in_activation_dtype_keeps_fp32_parameters_and_peft_s_results(tmp_path):
    """On a bf16 base, LoRA's matmuls run in bf16: the outputs and LoRA gradients are PEFT's (fp32
    adapters) to bf16 rounding, the parameters and their gradients stay fp32, and the adapter saves
    the same tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fcdistill.train.throughput import lora_in_activation_dtype

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    ids = torch.randint(0, 300, (1, 40))

    def run(patched: bool):
        torch.manual_seed(1)
        base = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        seen = []
        lora_a = model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"]
        lora_a.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        if patched:
            assert lora_in_activation_dtype(model) == 14  # 7 linear layers x 2 decoder layers
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert seen == [torch.bfloat16 if patched else torch.float32]  # the adapter's matmul ran in bf16 or not
        return out.logits.float().detach(), out.loss.item(), grads, model.state_dict()

    ref_logits, ref_loss, ref_grads, ref_state = run(False)
    logits, loss, grads, state = run(True)
    assert abs(loss - ref_loss) < 2e-2
    assert (logits - ref_logits).abs().max() < 0.1
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.98, (name, cos)
    assert state.keys() == ref_state.keys()
    assert all(state[k].dtype == ref_state[k].dtype for k in state)
