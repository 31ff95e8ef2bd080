"""The licence files: LICENSE matches pyproject's Apache-2.0, the notices of what the package bundles
are declared for the wheel and the sdist, and CLIP's MIT licence ships beside its vocabulary file.
(`pip wheel . --no-deps --no-build-isolation` puts both into .dist-info/licenses; checked by hand.)"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_licence_files_declared_and_present():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; 3.10 is supported)
    assert '\nlicense = "Apache-2.0"\n' in pyproject
    assert '\nlicense-files = ["LICENSE", "THIRD_PARTY_NOTICES.md"]\n' in pyproject
    assert "Apache License\n                        Version 2.0" in (ROOT / "LICENSE").read_text()
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    assert "bpe_simple_vocab_16e6.txt.gz" in notices and "MIT License" in notices


def test_bundled_clip_vocabulary_has_its_licence():
    clip = ROOT / "src" / "velodiff" / "assets" / "clip"
    text = (clip / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2021 OpenAI" in text
    # package-data "assets/**/*" ships every file of the folder in the wheel
    assert 'velodiff = ["py.typed", "assets/**/*",' in (ROOT / "pyproject.toml").read_text()
