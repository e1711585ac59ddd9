"""The region settings from every source, and a bad one refused by name.

``Config.load`` (TOML file, ``FASTWS_*`` env, CLI flags) in process, then
``fastws serve`` as a real process: a bad region setting ends it with exit
code 2 and one line naming the key, before anything listens.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fastws.config import Config, ConfigError, parse_region_peers
from regions_helpers import REPO, SERVE

BROKER = "redis://127.0.0.1:6379/0"


def test_region_settings_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "fastws.toml"
    toml.write_text(f'broker = "{BROKER}"\nregion = "eu"\n'
                    'region_peers = ["eu=redis://10.1.0.5:6379/0", "us=redis://10.2.0.5:6379/1"]\n'
                    'region_queue_max = 500\nregion_queue_age = "10m"\n')
    c = Config.load(toml, env={"FASTWS_REGION_DIRECTORY_TTL": "45s"}, overrides={"region_queue_max": "700"})
    assert c.region_peers == "eu=redis://10.1.0.5:6379/0,us=redis://10.2.0.5:6379/1"
    assert parse_region_peers(c.region_peers) == {"eu": "redis://10.1.0.5:6379/0", "us": "redis://10.2.0.5:6379/1"}
    assert (c.region_queue_max, c.region_queue_age, c.region_directory_ttl) == (700, 600.0, 45.0)
    assert c.sources["region_queue_max"] == "cli --region-queue-max"
    assert c.sources["region_directory_ttl"] == "env FASTWS_REGION_DIRECTORY_TTL"
    assert c.sources["region_peers"] == f"file {toml}"


@pytest.mark.parametrize(("values", "key"), [
    ({"region": "eu", "region_peers": "us=http://10.2.0.5"}, "region_peers"),
    ({"region": "eu", "region_peers": "us=redis://a:1,us=redis://b:1"}, "region_peers"),
    ({"region": "eu", "region_peers": "u s=redis://a:1"}, "region_peers"),
    ({"region_peers": "us=redis://a:1"}, "region"),
    ({"region": "e/u", "region_peers": "us=redis://a:1"}, "region"),
    ({"region": "eu", "region_peers": "us=redis://a:1", "broker": "redis+streams://127.0.0.1:6379/0"},
     "region_peers"),
    ({"region": "eu", "region_peers": "us=redis+cluster://a:1,b:2/0"}, "region_peers"),   # no database
    ({"region": "eu", "region_peers": "us=redis://a:1", "broker": "redis+cluster://127.0.0.1:7000",
      "broker_prefix": "app{1}"}, "broker_prefix"),
    ({"region_queue_max": 5}, "region_queue_max"),
    ({"region": "eu", "region_peers": "us=redis://a:1", "region_queue_max": 0}, "region_queue_max"),
    ({"region": "eu", "region_peers": "us=redis://a:1", "region_directory_ttl": 1}, "region_directory_ttl"),
])
def test_bad_region_setting_names_its_key(values: dict, key: str) -> None:
    values = {"broker": BROKER, **values}
    with pytest.raises(ConfigError) as err:
        Config(**values)
    assert err.value.key == key, err.value


def test_a_region_on_a_redis_cluster_is_taken_with_its_seeds() -> None:
    """A Redis Cluster URL names several seeds, comma-separated, as the pairs
    are: a new pair still starts at ``name=``; this region's broker can be
    one too."""
    peers = "us=redis+cluster://10.2.0.5:7000,10.2.0.6:7000,ap=redis://10.3.0.5:6379/0"
    c = Config(broker="redis+cluster://10.1.0.5:7000,10.1.0.6:7000", region="eu", region_peers=peers)
    assert parse_region_peers(c.region_peers) == {"us": "redis+cluster://10.2.0.5:7000,10.2.0.6:7000",
                                                  "ap": "redis://10.3.0.5:6379/0"}


def test_serve_refuses_a_bad_region_setting_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    out = subprocess.run([*SERVE, "serve", "examples.regions:app", "--port", "0", "--broker", BROKER, "--region", "eu",
                          "--region-peers", "us=redis://user:secret@10.2.0.5:6379/0,ap=http://x"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "region_peers" in lines[0] and "ap: not a redis://" in lines[0] and "secret" not in lines[0], lines
