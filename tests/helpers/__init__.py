"""Plain helpers the tests call with arguments (the fixtures are in tests/conftest.py):

- project: the repository copied as a clone has it (`project_copy`, `copy_tracked`), git, dvc
  and params.yaml edits, a workspace built up to `define`, trainers run as DVC runs them;
- model: a tiny captioner, a training loop, little pictures and captions, a model store;
- data: Flickr8k look-alikes, a Karpathy-split dataset of real photographs, a file server;
- weights: stand-ins for the downloaded weight files; hf_bert: the transformers reference;
- browser: Debian's Chromium driven by Playwright; dockerfile: a reader for the Dockerfile.

Import them as `from tests.helpers.model import tiny`.
"""
