"""NKI kernels (``verify_attention``, ``kv_append``, ``kv_gather``, ``accept_reject``) and
verispec's NKI interpreter.

* ``_nki``: the import indirection (AWS's ``nki`` when importable, else ``interp``);
* ``kv_append``, ``kv_gather``, ``verify_attention``, ``accept_reject``: the kernels, NKI 0.6
  dialect (Python ``range`` loops, ``nl.fori_loop`` for runtime trip counts, access patterns);
* ``backend``: torch wrappers, registered lazily as kernel backend ``"nki"``;
* ``interp``: the NumPy interpreter of the NKI subset, enforcing Trainium's tile rules.
"""
