"""Everything about weight files, one job per module (import the one you need; this file imports none,
so no module of the package can cycle through it):

* :mod:`.catalogue` - the published torchvision/timm ImageNet files and their facts (names, hashes,
  mean/std, input size, accuracy); ``DEFAULT_CFG`` for files it does not know.
* :mod:`.files` - reading and writing ``weights_only`` torch files and safetensors; format detection;
  :class:`~.files.CheckpointMismatchError`.
* :mod:`.cache` - offline lookup in the ``TORCH_HOME`` / Hugging Face caches; ``pretrained=`` resolved
  to a file (:class:`~.cache.PretrainedNotFoundError` when there is none).
* :mod:`.load` - loading into a model: strict reports, classifier dropping, input-channel adaptation.
* :mod:`.identify` - SHA-256, which catalogued weights a file holds, ``verify``.
* :mod:`.convert` - torchvision <-> timm <-> this project's checkpoint layout, checked by loading back.
* :mod:`.hub` - writing a classifier or backbone in timm's hub layout (``config.json`` + ``model.safetensors``)
  that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds with bitwise-equal logits.
* :mod:`.hub_folder` - reading such a folder (or ``hf-hub:USER/REPO`` from the local cache) as ``pretrained=``.
* :mod:`.testing` - random-weight files in the real formats under the real names, for tests.
"""
