"""Evaluation: running a pipeline over labelled data, metrics, reports, and the VAE mask study.
"""
