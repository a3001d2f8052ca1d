"""reference.py: the boundary to the authors' code. Parity with their outputs (current and paper era), their
constructor arguments from our flags, their state dicts and checkpoints, and the round trip to ModelConfig."""

import re
from pathlib import Path

import pytest
import torch

import model as M
import reference as R

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY = sorted((FIXTURES / "parity").glob("*.pt"))
PARITY_PAPER = sorted((FIXTURES / "parity_paper").glob("*.pt"))


def load_fixture(path):
    return torch.load(path, weights_only=False)


def flags_of(fixture):
    cli = dict(fixture["cli"])
    return dict(cli, vocab_size=cli.pop("vocab"), max_seq_len=cli.pop("block"))


# -----------------------------------------------------------------------------
# parity with the authors' outputs

@pytest.mark.parametrize("path,arch", [(p, "current") for p in PARITY] + [(p, "paper") for p in PARITY_PAPER],
                         ids=[p.stem for p in PARITY] + [f"paper-{p.stem}" for p in PARITY_PAPER])
def test_parity_fixture(path, arch):
    fixture = load_fixture(path)
    model = R.from_reference(fixture["kind"], fixture["model_args"], fixture["state_dict"], arch=arch)
    assert not model.training
    logits, loss = model(fixture["idx"], fixture["targets"])
    assert logits.shape == fixture["logits"].shape
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-4
    assert abs(loss.item() - float(fixture["loss"])) <= 1e-4
    assert sum(p.numel() for p in model.parameters()) == fixture["n_params"]


@pytest.mark.parametrize("path,arch", [(p, "current") for p in PARITY] + [(p, "paper") for p in PARITY_PAPER],
                         ids=[p.stem for p in PARITY] + [f"paper-{p.stem}" for p in PARITY_PAPER])
def test_flags_map_to_the_reference_constructor(path, arch):
    fixture = load_fixture(path)
    kind, args = R.model_args_from_flags(flags_of(fixture), arch=arch)
    assert kind == fixture["kind"]
    assert args == fixture["model_args"]


def test_parity_holds_for_a_prefix():
    """A sequence shorter than the block: logits equal the fixture's first positions."""
    fixture = load_fixture(FIXTURES / "parity" / "ra_posrel_rope.pt")
    model = R.from_reference(fixture["kind"], fixture["model_args"], fixture["state_dict"])
    logits, _ = model(fixture["idx"][:, :17])
    assert (logits - fixture["logits"][:, :17]).abs().max().item() <= 1e-4


def test_reference_state_dict_with_wrong_shapes_is_refused():
    fixture = load_fixture(FIXTURES / "parity" / "tf_rope.pt")
    args = dict(fixture["model_args"], d_model=32, n_heads=2)
    with pytest.raises(ValueError, match="does not fit"):
        R.from_reference(fixture["kind"], args, fixture["state_dict"])


def test_checkpoints_of_either_arch_load_with_inferred_kind():
    for path, arch in ((FIXTURES / "parity" / "disrca_symattn_rope.pt", "current"),
                       (FIXTURES / "parity_paper" / "ra_posrel_rope.pt", "paper"),
                       (FIXTURES / "parity_paper" / "tf_rope.pt", "paper")):
        fixture = load_fixture(path)
        state = {f"_orig_mod.{k}": v for k, v in fixture["state_dict"].items()}
        ckpt = dict(model=state, model_args=fixture["model_args"])
        assert R.checkpoint_kind_and_arch(ckpt) == (fixture["kind"], arch)
        logits, _ = R.model_from_checkpoint(ckpt)(fixture["idx"])
        assert (logits - fixture["logits"]).abs().max().item() <= 1e-4


# -----------------------------------------------------------------------------
# model_args <-> ModelConfig

@pytest.mark.parametrize("path,arch", [(p, "current") for p in PARITY] + [(p, "paper") for p in PARITY_PAPER],
                         ids=[p.stem for p in PARITY] + [f"paper-{p.stem}" for p in PARITY_PAPER])
def test_model_args_round_trip_through_the_config(path, arch):
    fixture = load_fixture(path)
    config = R.config_from_reference(fixture["kind"], fixture["model_args"], arch)
    assert config == M.ModelConfig.from_flags(dict(flags_of(fixture), arch=arch))
    assert R.reference_args(config) == (fixture["kind"], fixture["model_args"])


def test_reference_defaults_apply_to_missing_arguments():
    """The authors' TransformerLM defaults: bias=True, pos_enc_type='pos_emb'."""
    args = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=4, dff=None, dropout_rate=0.0, activation="relu",
                norm_first=True, max_block_size=16)
    config = R.config_from_reference("TransformerLM", args)
    assert (config.bias, config.pos_enc_type, config.sa, config.ra, config.max_seq_len) == (True, "pos_emb", 4, 0, 16)
    model = R.from_reference("TransformerLM", args)
    block = model.layers.blocks[0]
    assert block.self_attn.wo.bias is not None and block.ff_block.linear1.bias is not None


@pytest.mark.parametrize("change,message", [
    (dict(kind="GPT"), "unknown model kind"),
    (dict(extra=1), "unknown extra"),
    (dict(drop="n_heads_sa"), "missing n_heads_sa"),
    (dict(n_heads_ra=0), "n_heads_ra > 0"),
    (dict(ra_kwargs={"use_relative_positional_symbols": True}), "use_relative_positional_symbols"),
    (dict(ra_kwargs={"rel_activation": "relu"}), "unsupported ra_kwargs"),
    (dict(symbol_retrieval="vq"), "unknown symbol_retrieval"),
    (dict(symbol_retrieval_kwargs=dict(d_model=32, n_symbols=40, n_heads=4)), "symbols of width 32"),
])
def test_bad_reference_arguments_are_refused(change, message):
    fixture = load_fixture(FIXTURES / "parity" / "ra_symattn_posemb.pt")
    kind, args = change.pop("kind", fixture["kind"]), dict(fixture["model_args"])
    args.pop(change.pop("drop", None), None)
    with pytest.raises(ValueError, match=message):
        R.from_reference(kind, dict(args, **change))


def test_flags_namespace_and_dict_agree():
    import argparse
    flags = dict(sa=2, ra=2, d_model=32, n_layers=2, symbol_type="position_relative", pos_enc_type="RoPE",
                 ra_type="rca", max_seq_len=16, vocab_size=0, symmetric_rels=1, batch_size=8)
    assert R.model_args_from_flags(argparse.Namespace(**flags)) == R.model_args_from_flags(flags)
    kind, args = R.model_args_from_flags(flags, arch="paper")
    assert kind == "AbstractTransformerLM" and args["rca_type"] == "standard" and args["rca_kwargs"] == {
        "use_relative_positional_symbols": True}  # symmetric relations belong to RA only
    assert args["vocab_size"] == 32000  # --vocab_size 0: the Llama 2 tokenizer


# -----------------------------------------------------------------------------
# the Hugging Face format of the authors' package

def the_package(monkeypatch):
    """The authors' `dual-attention` package (pip), with its RCA/DisRCA import fixed (they use model_utils without
    importing it)."""
    hf = pytest.importorskip("dual_attention.hf", reason="pip install dual-attention huggingface_hub")
    import dual_attention.model_utils
    import dual_attention.relational_attention
    monkeypatch.setattr(dual_attention.relational_attention, "model_utils", dual_attention.model_utils, raising=False)
    return hf


def dat_args(**changes):
    """A small DAT in the style of the authors' published models (GELU, RoPE, no bias, 8 symbols of 2 heads,
    frozen symbols, grouped-query attention with n_relations != ra)."""
    args = dict(vocab_size=50, d_model=64, n_layers=2, n_heads_sa=4, n_heads_ra=4, dff=None, dropout_rate=0.0,
                activation="gelu", norm_first=True, max_block_size=16, pos_enc_type="RoPE", bias=False,
                symbol_retrieval="symbolic_attention",
                symbol_retrieval_kwargs=dict(d_model=64, n_symbols=8, n_heads=2, trainable_symbols=False),
                symbol_retriever_config=dict(shared_symbol_retriever=True, weight_tie_symbol_library=False),
                sa_kwargs=dict(n_kv_heads=2), ra_kwargs=dict(n_kv_heads=2, n_relations=8, rel_activation="identity",
                                                             rel_proj_dim=None, symmetric_rels=False),
                ra_type="relational_attention", share_attn_params=False)
    return dict(args, **changes)


PACKAGE_MODELS = {
    "published-style": ("DualAttnTransformerLM", dat_args()),
    "mqa-symmetric-shared": ("DualAttnTransformerLM", dat_args(
        sa_kwargs=dict(n_kv_heads=1), ra_kwargs=dict(n_kv_heads=1, symmetric_rels=True), share_attn_params=True)),
    "disrca-rmsnorm-postnorm": ("DualAttnTransformerLM", dat_args(
        ra_type="disrca", ra_kwargs=dict(n_kv_heads=1), norm_type="rmsnorm", norm_first=False, activation="swiglu")),
    "rca-relative-posemb": ("DualAttnTransformerLM", dat_args(
        ra_type="rca", ra_kwargs=dict(n_kv_heads=2, use_relative_positional_symbols=True), pos_enc_type="pos_emb",
        symbol_retrieval="position_relative", symbol_retrieval_kwargs=dict(symbol_dim=64, max_rel_pos=5))),
    "ra-relative": ("DualAttnTransformerLM", dat_args(
        ra_kwargs=dict(n_kv_heads=4, use_relative_positional_symbols=True), symbol_retrieval="position_relative",
        symbol_retrieval_kwargs=dict(symbol_dim=64, max_rel_pos=16))),
    "transformer-gqa": ("TransformerLM", dict(
        vocab_size=50, d_model=64, n_layers=2, n_heads=8, dff=None, dropout_rate=0.0, activation="swiglu",
        norm_first=True, max_block_size=16, pos_enc_type="RoPE", bias=False, use_flash_attention=True,
        block_kwargs=dict(attn_kwargs=dict(n_kv_heads=2)))),
}


def package_model(hf, kind, args):
    """Their model (eval mode) with weights redrawn at a large scale, so every path moves the logits."""
    torch.manual_seed(0)
    model = getattr(hf, f"{kind}_HFHub")(**args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", PACKAGE_MODELS)
def test_a_package_saved_model_loads_with_equal_logits(name, tmp_path, monkeypatch):
    """save_pretrained of their package -> load_hf_directory -> the same logits; and back (save_hf_directory ->
    their from_pretrained)."""
    hf = the_package(monkeypatch)
    kind, args = PACKAGE_MODELS[name]
    theirs = package_model(hf, kind, args)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = R.load_hf_directory(str(tmp_path / "theirs"))
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = theirs(idx)[0]
        assert (ours(idx)[0] - expected).abs().max().item() <= 1e-4
        assert R.save_hf_directory(ours, tmp_path / "ours") == kind
        again = getattr(hf, f"{kind}_HFHub").from_pretrained(tmp_path / "ours").eval()
        assert (again(idx)[0] - expected).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_grouped_query_attention_has_the_authors_shapes():
    config = R.config_from_reference("DualAttnTransformerLM", dat_args())
    assert (config.n_kv_heads_sa, config.n_kv_heads_ra, config.n_relations, config.rel_dim) == (2, 2, 8, 4)
    block = M.build_model(config).layers.blocks[0].dual_attn
    assert block.self_attention.wk.weight.shape == block.self_attention.wv.weight.shape == (16, 64)
    ra = block.relational_attention
    assert ra.wk_attn.weight.shape == ra.wv.weight.shape == (16, 64)
    assert ra.wq_attn.weight.shape == (32, 64)
    assert ra.wq_rel.weight.shape == (32, 64) and ra.wr.shape == (4, 8, 8)
    assert R.reference_args(config)[1]["ra_kwargs"] == dict(n_kv_heads=2, n_relations=8, rel_proj_dim=4,
                                                            symmetric_rels=False)


@pytest.mark.parametrize("change,message", [
    (dict(symbol_retriever_config=dict(shared_symbol_retriever=False)), "shared_symbol_retriever=False"),
    (dict(ra_kwargs=dict(rel_activation="relu")), "unsupported ra_kwargs: rel_activation='relu'"),
    (dict(sa_kwargs=dict(add_bias_out=True)), "unsupported sa_kwargs: add_bias_out=True"),
    (dict(sa_kwargs=dict(n_kv_heads=3)), "n_kv_heads_sa=3 must divide the 4 heads"),
    (dict(ra_kwargs=dict(n_relations=8, rel_proj_dim=8)), "rel_proj_dim=8"),
    (dict(norm_type="none"), "unknown norm_type"),
    (dict(n_heads_sa=2, n_heads_ra=6, share_attn_params=True), "share_attn_params needs sa == ra"),
])
def test_options_we_do_not_build_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        R.config_from_reference("DualAttnTransformerLM", dat_args(**change))


def test_a_paper_era_model_is_not_exported(tmp_path):
    fixture = load_fixture(FIXTURES / "parity_paper" / "ra_symattn_rope.pt")
    model = R.from_reference(fixture["kind"], fixture["model_args"], fixture["state_dict"], arch="paper")
    with pytest.raises(ValueError, match="paper-era model"):
        R.save_hf_directory(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
