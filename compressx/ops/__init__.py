"""Tensor math shared by several passes (N:M masks, quantizers, packing). Pure functions, no model code."""
