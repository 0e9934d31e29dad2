"""Pure, stateless math of the methods (vectorised, tested on tiny tensors)."""
