"""Teacher labeling and synthetic data with verification (`fcd label`, `fcd synth`, `fcd verify`).

config (TeacherConfig on the neutral fcdistill.client) -> ask (calls and JSON from replies) ->
inputs (options, tools, seeds, example files) -> plan (generation requests and prompts) ->
judge (the teacher's verdict) -> verify (the stages in order) -> synth (the run); label (fcd label);
execute (+ exec_runner) runs calls in subprocesses; templates holds the prompts.
"""
