"""model.py: the config and its validation, causality, generation, errors, initialisation, FLOP counts, and the
paper-era parameter counts (parity with the authors' outputs: tests/test_reference.py)."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import reference as R

PAPER_LOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper_logs" / "tiny_stories_run_histories.csv"

# -----------------------------------------------------------------------------
# every attention and symbol type

def small_flags(**overrides):
    flags = dict(sa=2, ra=2, d_model=32, n_layers=2, symbol_type="symbolic_attention", pos_enc_type="RoPE",
                 ra_type="relational_attention", max_seq_len=16, vocab_size=50, dropout_rate=0.0)
    return dict(flags, **overrides)


VARIANTS = [dict(ra=0, sa=4)] + [
    dict(ra_type=ra_type, symbol_type=symbol_type, pos_enc_type=pos)
    for ra_type in ("relational_attention", "rca", "disrca")
    for symbol_type in ("symbolic_attention", "position_relative")
    for pos in ("RoPE", "pos_emb")
] + [dict(sa=0, ra=4), dict(symmetric_rels=1), dict(norm_first=0), dict(activation="relu", dff=24)]


def build(flags, arch="current"):
    return M.build_model(M.ModelConfig.from_flags(dict(flags, arch=arch))).eval()


@pytest.mark.parametrize("arch", ["current", "paper"])
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_causal(overrides, arch):
    """Changing token t never changes the logits before t."""
    torch.manual_seed(0)
    model = build(small_flags(**overrides), arch)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 50
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_backward_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    for overrides in VARIANTS:
        model = build(small_flags(**overrides)).train()
        idx = torch.randint(0, 50, (2, 10))
        _, loss = model(idx, idx)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (overrides, name)


def test_loss_ignores_targets_of_minus_one():
    torch.manual_seed(0)
    model = build(small_flags())
    idx = torch.randint(0, 50, (2, 10))
    targets = idx.clone()
    targets[:, 5:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 50), idx[:, :5].reshape(-1))
    assert torch.allclose(loss, expected)


def test_frozen_symbols_freeze_only_the_library():
    model = build(small_flags(trainable_symbols=0))
    retriever = model.layers.symbol_retrievers[0]
    assert not retriever.symbol_library.requires_grad
    assert retriever.template_features.requires_grad and retriever.q_proj.weight.requires_grad


def test_retriever_is_shared_by_all_layers():
    model = build(small_flags(n_layers=3))
    retrievers = model.layers.symbol_retrievers
    assert retrievers[0] is retrievers[1] is retrievers[2]
    assert len(model.state_dict()) > len(dict(model.named_parameters()))  # repeated per layer, counted once


def test_explicit_dff_sets_the_feed_forward_width():
    for activation in ("swiglu", "gelu"):
        model = build(small_flags(activation=activation, dff=40))
        assert model.layers.blocks[0].ff_block.linear1.weight.shape == (40, 32)
    assert build(small_flags()).layers.blocks[0].ff_block.linear1.weight.shape == (int(2 / 3 * 4 * 32), 32)
    assert build(small_flags(), "paper").layers.blocks[0].ff_block.linear1.weight.shape == (128, 32)


# -----------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("top_k", [None, 1, 5])
def test_generate(top_k):
    torch.manual_seed(0)
    model = build(small_flags()).train()
    prompt = torch.randint(0, 50, (2, 3))
    out = model.generate(prompt, max_new_tokens=20, top_k=top_k)  # runs past the block size of 16
    assert out.shape == (2, 23)
    assert torch.equal(out[:, :3], prompt)
    assert model.training  # the mode is restored
    if top_k == 1:  # greedy: each token is the argmax given the (cropped) context
        model.eval()
        for t in range(3, 23):
            logits, _ = model(out[:, max(0, t - 16):t])
            assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


CACHE_VARIANTS = VARIANTS + [dict(symbol_type="position_relative", max_rel_pos=5),
                             dict(ra_type="disrca", symbol_type="position_relative", max_rel_pos=3),
                             dict(d_model=64, sa=1, ra=3, ra_type="disrca")]  # h = 16: DisRCA's materialised path


@pytest.mark.parametrize("arch", ["current", "paper"])
@pytest.mark.parametrize("overrides", CACHE_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_generation_equals_uncached(overrides, arch):
    """Greedy and seeded sampling give the same tokens with and without the cache, for a batch, before and past
    the block size of 16 (the window slides after 12 new tokens); the logits agree at every step."""
    torch.manual_seed(0)
    model = build(small_flags(**overrides), arch)
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, 24, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 24, temperature=0), greedy)
    for sampling in (dict(), dict(temperature=0.8, top_k=10, top_p=0.9)):
        torch.manual_seed(1)
        uncached = model.generate(prompt, 24, use_cache=False, **sampling)
        torch.manual_seed(1)
        assert torch.equal(model.generate(prompt, 24, **sampling), uncached)
    decoder = M.CachedDecoder(model)
    with torch.no_grad():
        for t in range(4, greedy.size(1) + 1):
            torch.testing.assert_close(decoder(greedy[:, :t]), model.last_logits(greedy[:, max(0, t - 16):t]),
                                       rtol=1e-5, atol=1e-5)


def embedded_lengths(model):
    """The sequence length of every forward pass through the model (recorded at the token embedding)."""
    lengths = []
    model.layers.token_embedder.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    return lengths


def test_cache_runs_each_position_once_until_the_window_slides():
    """The prompt is run once, then one token per step; past the block size every step runs the whole window
    again (each cropped context starts at another token, so no cached key stays valid); a prompt longer than the
    block is cropped as the uncached path crops it."""
    torch.manual_seed(0)
    model = build(small_flags())
    lengths = embedded_lengths(model)
    model.generate(torch.randint(0, 50, (2, 5)), 14)
    assert lengths == [5] + [1] * 11 + [16] * 2
    lengths.clear()
    long_prompt = torch.randint(0, 50, (2, 20))
    out = model.generate(long_prompt, 3, temperature=0)
    assert lengths == [16] * 3
    assert torch.equal(out, model.generate(long_prompt, 3, temperature=0, use_cache=False))


def test_uncached_generation_computes_only_the_last_logits():
    torch.manual_seed(0)
    model = build(small_flags())
    shapes = []
    model.layers.final_out.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    lengths = embedded_lengths(model)
    model.generate(torch.randint(0, 50, (2, 5)), 3, use_cache=False)
    assert lengths == [5, 6, 7]  # every position's hidden state ...
    assert shapes == [(2, 50)] * 3  # ... but the output layer on the last position only


def test_cached_generation_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = build(small_flags())
    prompt = torch.randint(0, 50, (2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 8, temperature=0)
        decoder = M.CachedDecoder(model)
        with torch.no_grad():
            cached = [decoder(out[:, :t]) for t in range(4, 12)]
            uncached = [model.last_logits(out[:, :t]) for t in range(4, 12)]
    assert out.shape == (2, 12) and cached[-1].dtype == torch.bfloat16
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_compiled_decoding_step_equals_uncached():
    torch.manual_seed(0)
    model = build(small_flags(symbol_type="position_relative", pos_enc_type="pos_emb", n_layers=1))
    prompt = torch.randint(0, 50, (2, 4))
    expected = model.generate(prompt, 14, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 14, temperature=0, compile=True), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("overrides,compile", [(dict(), False), (dict(ra=0, sa=4), False),
                                               (dict(symbol_type="position_relative", pos_enc_type="pos_emb"), False),
                                               (dict(), True)])
def test_cuda_graph_decoding_equals_uncached(overrides, compile):
    torch.manual_seed(0)
    model = build(small_flags(**overrides)).cuda()
    prompt = torch.randint(0, 50, (3, 4), device="cuda")
    fast = dict(cuda_graph=True, compile=compile)
    expected = model.generate(prompt, 24, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 24, temperature=0, **fast), expected)
    torch.manual_seed(1)
    expected = model.generate(prompt, 24, use_cache=False)
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, 24, **fast), expected)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        decoder = M.CachedDecoder(model, **fast)
        with torch.no_grad():
            for t in range(4, 16):
                torch.testing.assert_close(decoder(expected[:, :t]).float(),
                                           model.last_logits(expected[:, :t]).float(), rtol=0.05, atol=0.05)


def draws(logits, n=2000, **sampling):
    """Tokens drawn n times from one row of logits."""
    torch.manual_seed(0)
    return M.sample_next(logits.log().expand(n, -1), **sampling).flatten()


def test_sampling_temperature_top_k_and_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    assert torch.equal(M.sample_next(probs.log(), temperature=0), torch.tensor([[1]]))
    assert set(draws(probs).tolist()) == {0, 1, 2, 3, 4}
    assert set(draws(probs, top_k=1).tolist()) == {1}
    assert set(draws(probs, top_k=2).tolist()) == {1, 3}
    assert set(draws(probs, top_p=0.5).tolist()) == {1}  # 0.5 alone reaches 0.5
    assert set(draws(probs, top_p=0.51).tolist()) == {1, 3}
    assert set(draws(probs, top_p=0.85).tolist()) == {0, 1, 3}
    assert set(draws(probs, top_p=0.01).tolist()) == {1}  # at least the most likely token
    assert set(draws(probs, top_p=1.0).tolist()) == {0, 1, 2, 3, 4}
    assert set(draws(probs, top_k=2, top_p=0.9).tolist()) == {1, 3}
    kept = draws(probs, top_p=0.85)  # renormalised over the nucleus: 0.1 / 0.9 of the draws are token 0
    assert abs((kept == 0).float().mean().item() - 0.1 / 0.9) < 0.03
    hot = draws(probs, temperature=100.0)  # a high temperature flattens the distribution
    assert abs((hot == 2).float().mean().item() - 0.2) < 0.04


# -----------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=30, sa=2, ra=2), "divisible by the number of heads"),
    (dict(activation="mish"), "unknown activation"),
    (dict(d_model=30, sa=3, ra=3, symbol_type="position_relative"), "even head width"),
    (dict(d_model=18, sa=1, ra=1, pos_enc_type="pos_emb"), "divisible by its 4 heads"),
    (dict(symbol_type="NA"), "--symbol_type"),
    (dict(ra_type="NA"), "--ra_type"),
    (dict(pos_enc_type="alibi"), "pos_enc_type"),
])
def test_invalid_configurations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(small_flags(**overrides))


def test_sequence_longer_than_the_block_is_refused():
    model = build(small_flags())
    with pytest.raises(ValueError, match="exceeds the block size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# -----------------------------------------------------------------------------
# initialisation

def test_reference_initialisation():
    torch.manual_seed(0)
    model = build(dict(small_flags(d_model=128, n_layers=4, max_seq_len=64, vocab_size=1000), sa=4, ra=4))
    blocks = model.layers.blocks
    assert model.layers.final_out.weight is model.layers.token_embedder.weight
    assert abs(model.layers.token_embedder.weight.std().item() - 0.02) < 0.002
    assert abs(blocks[0].dual_attn.relational_attention.wq_attn.weight.std().item() - 0.02) < 0.002
    assert abs(blocks[0].dual_attn.relational_attention.wr.std().item() - 0.02) < 0.004
    residual = 0.02 / math.sqrt(2 * 4)
    assert abs(blocks[1].dual_attn.self_attention.wo.weight.std().item() - residual) < 0.001
    assert abs(blocks[1].ff_block.linear3.weight.std().item() - residual) < 0.001  # swiglu: W3, as the reference
    assert abs(blocks[1].ff_block.linear2.weight.std().item() - 0.02) < 0.002
    assert blocks[0].ff_block.linear1.bias.abs().max() == 0
    retriever = model.layers.symbol_retrievers[0]
    assert abs(retriever.symbol_library.std().item() - 1.0) < 0.05
    assert abs(retriever.q_proj.weight.std().item() - 0.02) < 0.002 and retriever.q_proj.bias.abs().max() == 0


def test_paper_initialisation_is_pytorch_default():
    torch.manual_seed(0)
    model = build(dict(small_flags(d_model=128, n_layers=2, max_seq_len=64, vocab_size=1000), sa=4, ra=4), "paper")
    assert "norm" not in model.layers
    out = model.layers.final_out
    assert out.weight is not model.layers.token_embedder.weight and out.bias is not None
    assert abs(model.layers.token_embedder.weight.std().item() - 1.0) < 0.05
    assert out.weight.abs().max() <= 128 ** -0.5
    wr = model.layers.blocks[0].dual_attn.relational_attention.wr
    assert wr.abs().max() <= 0.5 and wr.std() > 0.2  # U(+-1/sqrt(n_r)), n_r = 4
    q_proj = model.layers.symbol_retrievers[0].q_proj
    assert q_proj.bias.abs().max() > 0  # the Linear default, not zeroed


def test_paper_relations_use_d_over_ra():
    model = build(dict(small_flags(d_model=80, max_seq_len=16), sa=2, ra=3, pos_enc_type="pos_emb"), "paper")
    ra = model.layers.blocks[0].dual_attn.relational_attention
    assert (ra.n_relations, ra.rel_dim) == (3, 26)
    assert ra.wq_rel.weight.shape == (78, 80)


def test_paper_gelu_is_exact():
    current = build(small_flags(activation="gelu")).layers.blocks[0].ff_block.act
    paper = build(small_flags(activation="gelu"), "paper").layers.blocks[0].ff_block.act
    assert current.approximate == "tanh" and paper.approximate == "none"


# -----------------------------------------------------------------------------
# FLOPs

def test_transformer_flops_follow_the_palm_formula():
    model = build(dict(small_flags(ra=0, sa=4), vocab_size=100))
    N = model.num_params(non_embedding=True)  # tied: the embedding is the output layer
    N -= sum(p.numel() for n, p in model.named_parameters() if "norm" in n or n.endswith("bias"))
    L, d, T = 2, 32, 16
    assert model.flops_per_token() == 6 * N + 12 * L * d * T


def test_dat_flops_count_the_relational_products():
    T, d, L, V = 16, 32, 2, 100
    transformer = build(dict(small_flags(ra=0, sa=4), vocab_size=V))
    dat = build(dict(small_flags(), vocab_size=V))
    blocks_linear = sum(M.linear_flops(b) for b in dat.layers.blocks)
    retriever = dat.layers.symbol_retrievers[0]
    # per layer: 2 SA heads and 2 RA heads of width 8 (4T h each), 2 relations of width 8 over T keys,
    # their aggregation per head (2 T n_r), and W_r; the retriever: q_proj and 2 x 2 n_s d
    per_layer = 4 * T * 2 * 8 + 4 * T * 2 * 8 + 2 * T * 2 * 8 + 2 * T * 2 * 2 + 2 * (2 * 8 * 2)
    retriever_flops = M.linear_flops(retriever) + 4 * 16 * d
    expected = 3 * (2 * d * V + blocks_linear + L * per_layer + L * retriever_flops)
    assert dat.flops_per_token() == expected
    assert dat.flops_per_token() > transformer.flops_per_token()
    assert dat.estimate_mfu(1e6, 1e12) == pytest.approx(dat.flops_per_token() * 1e6 / 1e12)


def test_position_relative_flops_do_not_apply_wv_per_token():
    dat = build(small_flags(symbol_type="position_relative"))
    symbolic = build(small_flags())
    ra = dat.layers.blocks[0].dual_attn.relational_attention
    table_rows = 2 * 16 + 1
    per_token_wv = M.linear_flops(ra.wv)
    difference = (symbolic.flops_per_token() - dat.flops_per_token()) // 3
    retriever = symbolic.layers.symbol_retrievers[0]
    symbolic_retriever = 2 * (M.linear_flops(retriever) + 4 * retriever.symbol_library.numel())
    table_projection = 2 * ra.wv.weight.numel() * table_rows * 2 // 16
    assert difference == 2 * per_token_wv + symbolic_retriever - table_projection


# -----------------------------------------------------------------------------
# the paper-era parameter counts, against the authors' logged runs

PAPER_RA_TYPES = {"disentangled_v2": "relational_attention", "standard": "rca", "disentangled_v1": "disrca"}
PAPER_SYMBOLS = {"sym_attn": "symbolic_attention", "pos_relative": "position_relative"}


def logged_configurations():
    """One (flags, n_params, n_params_wo_embedding, run name) per distinct configuration of the logs."""
    configs = {}
    with open(PAPER_LOGS, newline="") as f:
        for row in csv.DictReader(f):
            flags = dict(sa=int(row["sa"]), ra=int(row["rca"]), d_model=int(row["d_model"]),
                         n_layers=int(row["n_layers"]), symbol_type=PAPER_SYMBOLS.get(row["symbol_type"], "NA"),
                         ra_type=PAPER_RA_TYPES.get(row["rca_type"], "NA"),
                         symmetric_rels=int(row["symmetric_rels"] == "True"),
                         trainable_symbols=int(row["trainable_symbols"] != "False"),
                         max_seq_len=int(row["max_seq_len"]), activation=row["activation"],
                         pos_enc_type=row["pos_enc_type"], norm_first=int(row["norm_first"] == "True"),
                         vocab_size=int(row["vocab_size"]))
            configs[tuple(sorted(flags.items()))] = (flags, int(row["n_params"]),
                                                     int(row["n_params_wo_embedding"]), row["name"])
    return list(configs.values())


@pytest.mark.skipif(not PAPER_LOGS.exists(), reason=f"the authors' run logs are not at {PAPER_LOGS}")
def test_paper_parameter_counts_equal_the_logged_runs():
    """Every configuration of the paper's table (d <= 128) matches; of the exploratory runs, only the
    d=512 Transformer of 2024-05-02 differs (a bug of that day's code, see README.md)."""
    mismatches, table_rows = [], 0
    for flags, n_params, n_params_wo_embedding, name in logged_configurations():
        with torch.device("meta"):
            model = build(flags, "paper")
        V, d = flags["vocab_size"], flags["d_model"]
        counts = (model.num_params(), model.num_params() - (2 * V * d + V))
        if counts != (n_params, n_params_wo_embedding):
            mismatches.append(name)
        table_rows += d <= 128
    assert table_rows >= 37
    assert len(mismatches) == 1 and mismatches[0].startswith("sa=8; d=512; L=8;"), mismatches


# -----------------------------------------------------------------------------
# the config

def test_config_derives_the_widths_once():
    config = M.ModelConfig.from_flags(small_flags(d_model=48, sa=1, ra=3, activation="gelu"))
    assert (config.n_heads, config.head_dim, config.d_ff, config.n_relations, config.rel_dim) == (4, 12, 192, 3, 12)
    assert M.ModelConfig.from_flags(dict(small_flags(d_model=48, sa=1, ra=3), arch="paper")).rel_dim == 16
    assert M.ModelConfig.from_flags(small_flags(d_model=48)).d_ff == 128  # int(2/3 * 4 * 48)
    assert config.kind == "DualAttnTransformerLM" and config.n_symbols == 16 and config.max_rel_pos is None


def test_config_resets_what_does_not_apply():
    """Equal configs build equal models: the Transformer ignores symbol and relational flags, only RA has
    symmetric relations, position-relative symbols have no library."""
    transformer = M.ModelConfig.from_flags(small_flags(ra=0, sa=4, symmetric_rels=1))
    assert transformer == M.ModelConfig.from_flags(dict(small_flags(ra=0, sa=4), symbol_type="NA", ra_type="NA"))
    assert transformer.kind == "TransformerLM"
    assert not M.ModelConfig.from_flags(small_flags(ra_type="rca", symmetric_rels=1)).symmetric_rels
    relative = M.ModelConfig.from_flags(small_flags(symbol_type="position_relative", trainable_symbols=0))
    assert (relative.max_rel_pos, relative.n_symbols, relative.trainable_symbols) == (16, None, True)


def test_a_config_builds_only_its_kind():
    with pytest.raises(ValueError, match="cannot build a TransformerLM"):
        M.TransformerLM(M.ModelConfig.from_flags(small_flags()))


def test_missing_flags_are_named():
    with pytest.raises(ValueError, match="missing flags: --d_model"):
        M.ModelConfig.from_flags(dict(sa=1, ra=0, n_layers=1, pos_enc_type="RoPE"))


# -----------------------------------------------------------------------------
# attention maps

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PARITY = sorted((Path(__file__).resolve().parent / "fixtures" / "parity").glob("*.pt"))

# Runs in a separate process with the authors' modules first on sys.path (their attention.py shares our module's
# name): for each parity fixture, their blocks' weights with need_weights=True; the symbol-retrieval weights from
# their package's visualisation helper, when the package is installed.
REFERENCE_MAPS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import language_models, model_utils, relational_attention
relational_attention.model_utils = model_utils  # used there without an import
try:
    from dual_attention.model_analysis.datlm_utils import symbolic_attn_forward_get_weights
except ImportError:
    symbolic_attn_forward_get_weights = None
results = {}
for name, f in torch.load(sys.argv[2], weights_only=False).items():
    model = getattr(language_models, f["kind"])(**f["model_args"]).eval()
    model.load_state_dict(f["state_dict"])
    T = f["idx"].size(1)
    x = model.layers.token_embedder(f["idx"])
    rope = dict(freqs_cos=None, freqs_sin=None)
    if model.pos_enc_type == "pos_emb":
        x = x + model.layers.positional_embedder(torch.arange(T))
    else:
        rope = dict(freqs_cos=model.freqs_cos[:T], freqs_sin=model.freqs_sin[:T])
    maps = []
    with torch.no_grad():
        for layer, block in enumerate(model.layers.blocks):
            h = block.norm1(x) if block.norm_first else x
            if f["kind"] == "TransformerLM":
                maps.append(dict(self_attention=block.self_attn(h, h, h, is_causal=True, need_weights=True, **rope)[1]))
                x = block(x, **rope)
                continue
            retriever = model.layers.symbol_retrievers[layer]
            symbols = retriever(x)
            _, sa, ra = block.dual_attn(h, symbols, is_causal=True, need_weights=True, **rope)
            m = dict(self_attention=sa, relational_attention=ra[0], relations=ra[1] if len(ra) > 1 else None)
            if hasattr(retriever, "template_features") and symbolic_attn_forward_get_weights:
                m["symbol_attention"] = symbolic_attn_forward_get_weights(retriever, x)[1]
            maps.append(m)
            x = block(x, symbols, **rope)
    results[name] = maps
torch.save(results, sys.argv[3])
"""


def assert_maps_equal(ours, theirs, keys):
    for layer, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        for key in keys:
            if t.get(key) is None:
                assert o[key] is None, (layer, key)
            else:
                torch.testing.assert_close(o[key], t[key], rtol=1e-4, atol=1e-5, msg=f"layer {layer}: {key}")


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"the authors' modules are not at {REFERENCE}")
def test_attention_maps_equal_the_authors_modules(tmp_path):
    """Every parity fixture (RA, RCA, DisRCA, symmetric relations, both symbol kinds, both position encodings,
    post-norm, the Transformer): our maps equal what their modules return with need_weights=True."""
    fixtures = {p.stem: torch.load(p, weights_only=False) for p in PARITY}
    torch.save(fixtures, tmp_path / "fixtures.pt")
    result = subprocess.run([sys.executable, "-c", REFERENCE_MAPS, str(REFERENCE), "fixtures.pt", "maps.pt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "maps.pt", weights_only=False)
    keys = ["self_attention", "relational_attention", "relations"]
    for name, f in fixtures.items():
        model = R.from_reference(f["kind"], f["model_args"], f["state_dict"])
        ours = model.attention_maps(f["idx"])
        assert_maps_equal(ours, theirs[name], keys + ["symbol_attention"] * ("symbol_attention" in theirs[name][0]))


def test_attention_maps_of_grouped_query_models_equal_the_authors_package(monkeypatch):
    """Their package's own visualisation forward (datlm_forward_w_intermediate_results) on published-style models:
    grouped-query attention, 8 relations of 4 heads, 8 symbols of 2 heads; and sa = 0."""
    hf = pytest.importorskip("dual_attention.hf", reason="pip install dual-attention huggingface_hub")
    from dual_attention.model_analysis.datlm_utils import datlm_forward_w_intermediate_results
    from test_reference import dat_args, package_model
    for args in (dat_args(), dat_args(n_heads_sa=0, n_heads_ra=8, ra_kwargs=dict(n_kv_heads=4), sa_kwargs={})):
        theirs = package_model(hf, "DualAttnTransformerLM", args)
        ours = R.from_reference("DualAttnTransformerLM", args, theirs.state_dict())
        idx = torch.randint(0, 50, (2, 16))
        with torch.no_grad():
            _, results = datlm_forward_w_intermediate_results(theirs, idx)
        expected = [dict(self_attention=sa, relational_attention=ra, relations=rel, symbol_attention=sym)
                    for sa, ra, rel, sym in zip(results["sa_attn_scores"], results["ra_attn_scores"],
                                                results["ra_rels"], results["symbol_attn_scores"])]
        maps = ours.attention_maps(idx)
        assert_maps_equal(maps, expected, ["self_attention", "relational_attention", "relations", "symbol_attention"])
        assert maps[0]["relations"].shape == (2, 16, 16, 8) and maps[0]["symbol_attention"].shape == (2, 2, 16, 8)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_attention_maps_shapes_and_probabilities(overrides):
    torch.manual_seed(0)
    model = build(small_flags(**overrides)).train()
    config = model.config
    maps = model.attention_maps(torch.randint(0, 50, (2, 12)))
    assert model.training and len(maps) == config.n_layers
    B, T = 2, 12
    for m in maps:
        for key, heads in (("self_attention", config.sa), ("relational_attention", config.ra)):
            if heads == 0:
                assert m[key] is None
                continue
            assert m[key].shape == (B, heads, T, T)
            assert torch.allclose(m[key].sum(-1), torch.ones(B, heads, T))
            assert (m[key].triu(1) == 0).all()  # causal
        relations = {"relational_attention": (B, T, T, config.ra), "disrca": (B, config.ra, T, T)}
        assert (m["relations"] is None) == (config.ra_type not in relations)
        if m["relations"] is not None:
            assert m["relations"].shape == relations[config.ra_type]
        if config.symbol_type == "symbolic_attention":
            assert m["symbol_attention"].shape == (B, 4, T, config.n_symbols)
            assert torch.allclose(m["symbol_attention"].sum(-1), torch.ones(B, 4, T))
        else:
            assert m["symbol_attention"] is None


@pytest.mark.parametrize("overrides", [o for o in VARIANTS if o.get("ra") != 0 and o.get("pos_enc_type") != "pos_emb"],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_attention_maps_are_the_weights_of_the_plain_formulation(overrides):
    """Each block's dual-attention output, recomputed by the plain formulation (every product materialised) from
    the maps alone, equals the block's own output: the maps are the weights the model computes with."""
    from attention import attend_pairs, pair_symbol_values
    torch.manual_seed(0)
    model = build(small_flags(**overrides)).double()
    idx = torch.randint(0, 50, (2, 12))
    maps = model.attention_maps(idx)
    inputs = []  # each dual-attention layer's input (x, symbols, rope)
    hooks = [block.dual_attn.register_forward_pre_hook(lambda module, args: inputs.append(args))
             for block in model.layers.blocks]
    model(idx)
    for hook in hooks:
        hook.remove()
    ra_type = model.config.ra_type
    for m, block, (x, symbols, rope, *_) in zip(maps, model.layers.blocks, inputs, strict=True):
        sa, ra = block.dual_attn.self_attention, block.dual_attn.relational_attention
        w = m["relational_attention"] * (m["relations"] if ra_type == "disrca" else 1)  # DisRCA: alpha * rho
        relational = attend_pairs(w, pair_symbol_values(ra, symbols, 12))
        if ra_type == "relational_attention":  # + sum_j alpha_ij W_r r_ij
            relational = relational + torch.einsum("bnij,bijl,nhl->bnih", w, m["relations"], ra.wr)
        outputs = [ra.wo(relational.transpose(1, 2).flatten(2))]
        if sa is not None:
            v = sa.wv(x).unflatten(-1, (sa.n_heads, -1)).transpose(1, 2)
            outputs.insert(0, sa.wo((m["self_attention"] @ v).transpose(1, 2).flatten(2)))
        expected = block.dual_attn(x, symbols, rope)
        assert (torch.cat(outputs, dim=-1) - expected).abs().max().item() < 1e-10
