"""Attention processors, one per behaviour (installed with diffusers' ``set_attn_processor``)."""
