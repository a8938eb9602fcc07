"""Inference at scale and its interfaces: the `digseg` command line, the dataset engine, COCO RLE output and
the label-map palette.
"""
