"""A stand-in for constriction that forwards every coder call to `server.py` (see there).

Covers what vaezip uses: `stream.stack.AnsCoder` (encode_reverse, decode, get_compressed,
is_empty, clone, num_bits, num_valid_bits) and the models Categorical, QuantizedGaussian and
Uniform, which travel as (kind, args, kwargs) and are built on the server.
"""

from __future__ import annotations

import os
import types
from multiprocessing.connection import Client

__version__ = "0.5.0+rpc"
AUTHKEY = b"vaezip-constriction-rpc"
_conn = None


def _call(*request):
    global _conn
    if _conn is None:
        _conn = Client(os.environ["VAEZIP_CONSTRICTION_RPC"], family="AF_UNIX", authkey=AUTHKEY)
    _conn.send(request)
    status, result = _conn.recv()
    if status != "ok":
        kind, message = result
        raise (ValueError if kind == "ValueError" else RuntimeError)(f"{kind}: {message}")
    return result


class _Model:
    def __init__(self, kind, *args, **kwargs):
        self.spec = (kind, args, kwargs)


class AnsCoder:
    def __init__(self, *args, _key=None):
        self._key = _key if _key is not None else _call("new", *args)

    def __del__(self):
        try:
            _call("del", self._key)
        except Exception:  # noqa: BLE001, S110 - the server or the connection may be gone at shutdown
            pass

    def clone(self):
        return AnsCoder(_key=_call("clone", self._key))

    def encode_reverse(self, symbols, model, *params):
        return _call("encode_reverse", self._key, (symbols, ("model", model.spec), *params))

    def decode(self, model, *params):
        return _call("decode", self._key, (("model", model.spec), *params))


for _name in ("get_compressed", "is_empty", "num_bits", "num_valid_bits"):
    setattr(AnsCoder, _name, lambda self, _op=_name: _call(_op, self._key, ()))

stream = types.SimpleNamespace(
    stack=types.SimpleNamespace(AnsCoder=AnsCoder),
    model=types.SimpleNamespace(**{kind: (lambda *a, _kind=kind, **k: _Model(_kind, *a, **k))
                                   for kind in ("Categorical", "QuantizedGaussian", "Uniform")}),
)
