"""Using a trained model outside training: embeddings of image files, ONNX / TorchScript export.

The command-line entry points are ``reidreg.extract`` and ``reidreg.export``; the modules here do the
work. ``image_list`` imports no torch, so that bad input is reported before torch is loaded.
"""
