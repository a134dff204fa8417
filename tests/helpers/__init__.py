"""What several test modules share; test modules import from here, never from each other or from scripts/.

    steps     random steps on the ring contract (one generator), `Case.check`: what a step must do,
              derived without the step's code; `make_step`: the same draw on an SSMCache, for the ops
    compare   one step of a Triton op against the float64 reference on copies of the same cache
    slots     random multi-layer caches for the slot operations (materialize, fork, export / import),
              their bits and poisoning
    quant     small Triton kernels driving the quantization device functions, shared test values
"""
