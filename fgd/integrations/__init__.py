"""Adapters for detector frameworks other than torchvision, each imported only when used
(``fgd.integrations.ultralytics`` needs the ``ultralytics`` extra)."""
