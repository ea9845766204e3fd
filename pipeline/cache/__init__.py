"""The content-addressed store: where every file of the pipeline lives and how an entry becomes valid.

- `storage`: local paths and object-store URIs behind one small pathlib subset, atomic writes, node copies.
- `manifests`: cache keys, entry folders and the manifest written last that makes an entry valid.
- `claims`: one builder per entry when concurrent jobs need it.
- `fingerprints`: content hashes of files and folders (model weights, input data), remembered.

It knows nothing of DPO: which entries exist and how their keys are made is `pipeline.data.entries`.
May use: `pipeline.config`, `pipeline.errors`, `pipeline.uris`.
"""
