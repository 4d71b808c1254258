"""The protocol: sealed messages are checked before they are unpickled; the worker directory's names."""

import pickle

import pytest

from ringtrain.errors import ChannelError, Failure
from ringtrain.protocol import Failed, Heartbeat, RankProgress, WorkDir, seal, unseal, write_atomic

KEY = b"k" * 32


class _Tripwire:
    """Unpickling this creates a file: proof that bytes were unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_sealed_messages_round_trip():
    message = Failed(Failure(1, "h", None, "SIGKILL", ""))
    assert unseal(KEY, seal(KEY, message)) == message
    beat = Heartbeat(0, (RankProgress(0, "h", seq=3, collective="allreduce", in_collective_for=2.0),))
    assert unseal(KEY, seal(KEY, beat, b"ctx"), b"ctx") == beat


@pytest.mark.parametrize(
    "tamper",
    [
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # a flipped bit in the pickle
        lambda blob: blob[:10] + bytes([blob[10] ^ 1]) + blob[11:],  # a flipped bit in the MAC
        lambda blob: b"XXXX" + blob[4:],  # not a sealed message
        lambda blob: blob[:20],  # truncated
    ],
)
def test_tampered_bytes_are_refused_before_unpickling(tmp_path, tamper):
    marker = tmp_path / "unpickled"
    blob = seal(KEY, _Tripwire(str(marker)))
    with pytest.raises(ChannelError):
        unseal(KEY, tamper(blob))
    assert not marker.exists()


def test_wrong_key_or_context_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    blob = seal(KEY, _Tripwire(str(marker)), b"c\x00")
    with pytest.raises(ChannelError, match="failed its integrity check"):
        unseal(b"x" * 32, blob, b"c\x00")
    with pytest.raises(ChannelError, match="failed its integrity check"):
        unseal(KEY, blob, b"c\x01")  # e.g. a frame replayed at another sequence number
    assert not marker.exists()
    # An unsealed pickle is refused outright.
    with pytest.raises(ChannelError, match="not a sealed ringtrain message"):
        unseal(KEY, pickle.dumps(_Tripwire(str(marker))))
    assert not marker.exists()


def test_workdir_names_every_file(tmp_path):
    files = WorkDir(tmp_path)
    names = {
        files.payload.name,
        files.release.name,
        files.result(2).name,
        files.error(2).name,
        files.status(2).name,
        files.fifo(2, "stdout").name,
        files.fifo(2, "stderr").name,
        files.progress(2).name,
        files.stacks(2).name,
        files.script_dir(2).name,
    }
    assert len(names) == 10  # all distinct
    assert all(p.parent == tmp_path for p in (files.payload, files.result(0), files.progress(1)))
    write_atomic(files.result(2), b"data")
    assert files.result(2).read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["result-2.pkl"]  # no temporary left behind
