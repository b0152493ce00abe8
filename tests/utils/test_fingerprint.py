"""Fingerprints see every in-place change of weights, including those that move no version counter."""

import torch

from diffusers_uce.utils.fingerprint import fingerprint, same_fingerprint


def test_fingerprints_follow_contents_not_version_counters():
    layer = torch.nn.Linear(8, 4)
    before = fingerprint([layer.weight, layer.bias])
    assert same_fingerprint(before, fingerprint([layer.weight.clone(), layer.bias.clone()]))  # contents, not identity
    version = layer.weight._version
    layer.weight.data += 1e-3  # what fuse_lora() does
    assert layer.weight._version == version and not same_fingerprint(before, fingerprint([layer.weight, layer.bias]))
    assert not same_fingerprint(fingerprint([torch.zeros(2, 3)]), fingerprint([torch.zeros(3, 2)]))
    assert fingerprint([torch.ones(3, dtype=torch.float16), None])[0].dtype == torch.int64
    assert not same_fingerprint(None, before)
