"""dmm.socket must offer every public name of the stdlib socket module."""

import socket as stdsocket

import dmm.socket as dsocket


def test_every_stdlib_name_is_present():
    missing = [name for name in stdsocket.__all__ if not hasattr(dsocket, name)]
    assert missing == []


def test_all_is_the_union_of_the_name_lists():
    assert set(dsocket.__all__) == set(dsocket.__implements__) | set(dsocket.__imports__) | set(dsocket.__extensions__)
    assert set(stdsocket.__all__) <= set(dsocket.__all__)


def test_reexports_are_the_stdlib_objects():
    for name in dsocket.__imports__:
        assert getattr(dsocket, name) is getattr(stdsocket, name), name


def test_implemented_names_are_dmm_s_own():
    for name in dsocket.__implements__:
        assert getattr(dsocket, name) is not getattr(stdsocket, name), name


def test_exceptions_and_enums_are_shared():
    assert dsocket.timeout is TimeoutError
    assert dsocket.error is OSError
    assert dsocket.AddressFamily is stdsocket.AddressFamily
    # Defined by the stdlib module though not in its __all__.
    assert dsocket.AddressInfo is stdsocket.AddressInfo
    assert dsocket.MsgFlag is stdsocket.MsgFlag
    assert dsocket._GLOBAL_DEFAULT_TIMEOUT is stdsocket._GLOBAL_DEFAULT_TIMEOUT


def test_public_callables_are_documented():
    for name in dsocket.__implements__ + dsocket.__extensions__:
        obj = getattr(dsocket, name)
        if callable(obj):
            assert obj.__doc__, name
