"""The shipped example domain for `fcd synth` (travel assistant): tools, seed examples, implementations."""
