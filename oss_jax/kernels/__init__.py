"""Fast paths: the same numbers as the reference math, computed the way XLA runs fastest.

The reference files (``oss_jax/attention.py``, ``moe.py``, ``mxfp4.py``) say what gpt-oss computes;
the modules here compute the same thing with less memory or time, and nothing else. Each is
tested equal to its reference in ``tests/test_kernels.py``. ``Attention`` and ``Experts`` use
them by default (``impl="fast"``); ``model.set_attributes(impl="reference")`` switches a whole
model to the reference math (see ``oss_jax.model.GptOss``).

* ``kernels.attention`` (equals ``attention.attention``):
  ``materialized``: the logits as one ``[G*T, H] @ [H, S]`` matmul per KV head, a layout XLA's
  CPU backend multiplies without transposing ``T x S`` arrays (short inputs);
  ``blockwise``: flash-style tiles with an online softmax, never a ``T x S`` array, key blocks
  no query can see skipped (long inputs, chunks against a KV cache);
  ``blockwise_causal``: self-attention that reads only the band of keys a sliding window can
  see, ``O(T * window)``; ``attend`` picks one of the three by size (``NAIVE_MAX``).
* ``kernels.experts`` (equals ``Experts.reference``, the mixture over the chosen experts):
  ``gather``, ``sorted`` and ``scan`` loops that apply one expert at a time to the tokens routed
  to it, reading a large expert in slices (``SLICE_BYTES``); ``experts_parallel``: the same
  loops on a device mesh, each device on its own experts, one ``psum``.
* ``kernels.mxfp4`` (equals ``mxfp4.decode`` and ``mxfp4.matmul``): decoding that builds float32
  bit patterns instead of looking values up, and a matmul on the two nibble planes that never
  interleaves the decoded weight.
* ``kernels.native`` (equals ``mxfp4.matmul`` and bf16 products, in ``tests/test_native.py``): a C++ CPU kernel
  (``native/mxfp4_cpu.cc``, an XLA FFI custom call compiled on first use) for one packed expert's
  matrix product, reading the 4-bit codes in place with a table look-up in registers; the packed
  experts use it on the CPU where it builds (``Experts.native``), else XLA's decode.
* ``kernels.logits`` (equals the unembedding's einsum in ``GptOss.apply``): the logits a slice of
  the vocabulary at a time, so XLA's CPU backend never holds a float32 copy of the whole
  unembedding (2.2 GiB on gpt-oss).
* ``kernels.linear`` (equals the einsums of ``Attention``; the unembedding through ``kernels.logits``):
  at a decode step (at most ``MAX_ROWS`` rows), bf16 weights multiplied by the native kernel
  (``native/bf16_cpu.cc``), which reads them in place instead of XLA's float32 copy of each.

Shape letters: the legend in ``oss_jax/model.py``. Nothing here imports the modules that use it.
"""
