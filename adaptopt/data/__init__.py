"""Datasets for the recipes: loaders that turn benchmark files into `datasets.DatasetDict`s."""
