"""Joining a Ray cluster by address: a wrong one is a clear exit 2 in seconds, not minutes of Ray's retries."""

import pytest

from accelc.errors import UsageError
from accelc.runtime import ray_cluster


@pytest.mark.parametrize("address", ["127.0.0.1", "ray://:10001", "127.0.0.1:port"])
def test_an_address_without_host_and_port_is_refused(address):
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        ray_cluster.start(None, address)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_address_nothing_answers_is_refused_quickly(address):
    with pytest.raises(UsageError, match="nothing answers there"):
        ray_cluster.start(None, address)  # refused before Ray is asked
