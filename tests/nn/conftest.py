import pytest


@pytest.fixture
def count_native_calls(monkeypatch):
    """count_native_calls(kernel) -> a list that collects the names of the kernel's functions as they are called."""

    def start(kernel):
        calls = []
        lib = kernel.get()
        if lib is None:
            return calls

        class Counting:
            def __getattr__(self, name):
                fn = getattr(lib, name)
                return lambda *args: (calls.append(name), fn(*args))[1]

        monkeypatch.setattr(kernel, "_lib", Counting())
        return calls

    return start
