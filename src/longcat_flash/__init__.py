"""longcat-flash: an open PyTorch implementation of Meituan's LongCat-Flash."""
__version__ = "0.1.0"
