"""Views of a model: parameter, KV-cache and FLOP bookkeeping (`longcat info`) and the theoretical decode cost model
(`longcat cost`), both from the config alone; the per-token expert view (`longcat explain`) runs the model."""
