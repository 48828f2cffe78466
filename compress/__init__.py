"""Model zoo and transformations (export, quantize, prune) of mnv3-compress."""
