"""Hardening options of an edit (diffusers_uce.core.hardening): presets, resolution and validation."""

import math

import pytest

from diffusers_uce.core.hardening import HardenOptions, check_harden_record, harden_preset, resolve_harden


def test_presets_follow_the_authors():
    assert harden_preset(["nudity"]) == (3, 0.1)
    assert harden_preset(["violence"], moderate="i2p") == (3, 0.1)
    assert harden_preset(["van gogh"], expand_prompts="art") == (1, 1e-3)
    assert harden_preset(["cassette player"], expand_prompts="object") == (1, 1e-3)
    assert harden_preset(["hate", "blood"]) == (2, 0.1)


def test_resolution():
    assert resolve_harden(False, erase=["a"]) is None and resolve_harden(0, erase=["a"]) is None
    assert resolve_harden(None, erase=[]) is None
    full = resolve_harden(True, erase=["van gogh", "picasso"], expand_prompts="art")
    assert full == {"rounds": 1, "reg": 1e-3, "lamb": 0.1, "preserve_scale": 0.1, "preserve": (" ", " "),
                    "tokens": "all"}
    custom = resolve_harden(4, HardenOptions(reg=0.5, preserve="a cat", tokens="record"), erase=["dog"])
    assert custom["rounds"] == 4 and custom["reg"] == 0.5 and custom["preserve"] == ("a cat",)
    assert check_harden_record(custom, ["dog"]) == custom
    assert check_harden_record(None, ["dog"]) is None


@pytest.mark.parametrize("harden, options, match", [
    (-1, None, "harden"), (2.0, None, "harden"), ("2", None, "harden"),
    (1, {"reg": 0}, "reg"), (1, {"reg": -1.0}, "reg"), (1, {"reg": math.inf}, "reg"), (1, {"reg": True}, "reg"),
    (1, {"lamb": math.nan}, "lamb"), (1, {"preserve_scale": 0.0}, "preserve_scale"),
    (1, {"tokens": "paper"}, "tokens"), (1, {"preserve": [1]}, "preserve"), (1, {"reg": 0.1, "foo": 1}, "foo"),
    (0, {"reg": 0.1}, "harden_options"), (1, [("reg", 0.1)], "harden_options"),
])
def test_bad_options(harden, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_harden(harden, options, erase=["dog"])


def test_needs_erased_concepts_and_valid_records():
    with pytest.raises(ValueError, match="erased concepts"):
        resolve_harden(2, erase=[])
    good = resolve_harden(2, erase=["dog"])
    for bad in ({**good, "rounds": 0}, {**good, "rounds": True}, {k: v for k, v in good.items() if k != "tokens"},
                {**good, "extra": 1}, "3 rounds"):
        with pytest.raises(ValueError):
            check_harden_record(bad, ["dog"])


@pytest.mark.parametrize("biased", [False, True])
def test_replay_equals_robust_harden(biased):
    """`replay_hardening` (checked once, recovery from the attack's own system) equals `robust.harden`."""
    import torch

    from diffusers_uce.core.hardening import HardenBlock, replay_hardening
    from diffusers_uce.core.robust import harden, stacked_gram
    from tests.core.test_robust import hom, setup

    s = setup(biased=biased)
    layers = [torch.cat([w, b[:, None]], 1) for w, b in zip(s["layers"], s["biases"])] if biased else s["layers"]
    gram = stacked_gram(layers)
    tokens = [hom(s[k]) if biased else s[k] for k in ("erase", "guide", "preserve")]
    weight = torch.full((4,), 0.3, dtype=torch.float64)
    block = HardenBlock(tokens[0], tokens[1], s["group"], 3, tokens[2], weight, 3, 0.1, 0.2)
    hardened, (sums,) = replay_hardening(gram, s["transform"], [block], biased)
    expected = harden(gram, s["transform"], s["erase"], s["guide"], s["preserve"], 3, reg=0.1, lamb=0.2,
                      preserve_scale=weight, biased=biased, group_index=s["group"])
    assert torch.allclose(hardened, expected.transform, rtol=1e-10, atol=1e-12)
    moved, gap, top, bottom = sums.unbind(1)
    assert torch.allclose(1 - (moved / gap).sqrt(), expected.recovery, atol=1e-8)
    assert torch.allclose((top / bottom).sqrt(), expected.norm_ratio, atol=1e-10)
