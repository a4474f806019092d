"""``image_codec: jpeg`` end to end: the client encodes at the topology's quality, each edge decodes
(strictly), and the answers are the in-process ensemble's on exactly the decoded pixels."""

from __future__ import annotations

import numpy as np
import yaml

from devit_mq.nodes.launcher import Launcher
from devit_mq.testbed.accuracy import jpeg_roundtrip
from devit_mq.topology import load_topology

from .runtime_helpers import make_bundle, reference, write_topology


def test_jpeg_topology_answers_like_the_reference_on_the_decoded_pixels(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    path = write_topology(tmp_path / "jpeg.yaml", bundle)
    data = yaml.safe_load(path.read_text())
    data.update(image_codec="jpeg", image_quality=60)
    path.write_text(yaml.safe_dump(data))
    assert load_topology(path).image_quality == 60
    y, x = np.mgrid[0:16, 0:16]
    rng = np.random.default_rng(0)
    images = np.clip((x * 16 + y * 8)[None, ..., None] + rng.normal(0, 20, (6, 16, 16, 1)), 0, 255).astype(np.uint8)
    decoded, _ = jpeg_roundtrip(images, 60)
    assert not np.array_equal(decoded, images)  # lossy: the check below is not vacuous
    with Launcher(path, log_dir=tmp_path / "logs") as launcher:
        pred = launcher.client.predict(images, batch_size=3, window=2)
    assert not pred.errors
    np.testing.assert_allclose(pred.probabilities, reference(bundle, decoded, "fp32"), atol=1e-5)
