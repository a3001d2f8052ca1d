"""reference.py: the boundary to the authors' code. Parity with their outputs (current and paper era), their
constructor arguments from our flags, their state dicts and checkpoints, and the round trip to ModelConfig."""

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
    (dict(ra_kwargs={"rel_activation": "relu"}), "unknown ra_kwargs"),
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
