"""Datasets the project trains and evaluates on (all shipped inside installed packages, never downloaded)."""
