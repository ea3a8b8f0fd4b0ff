import hashlib
import os
import stat

from metaflow import FlowSpec, secrets, step


def look():
    """What the step can see of its secret, without keeping the value: the
    test compares digests and checks the file the platform handed over."""
    path = os.environ["MFS_SECRETS_FILE"]
    st = os.stat(path)
    return {"user": os.environ["DB_USER"],
            "digest": hashlib.sha256(os.environ["DB_PASSWORD"].encode()).hexdigest(),
            "file": path, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
            "machine": os.environ.get("MFS_WORKER_NAME")}


class SecretFlow(FlowSpec):
    """@secrets(sources=["db"]) from the platform (fab secrets.set db)."""

    @secrets(sources=["db"])
    @step
    def start(self):
        self.seen = look()
        print("connected as %s" % self.seen["user"])
        self.next(self.end)

    @step
    def end(self):
        # A step without @secrets gets none of them.
        self.others_see = sorted(k for k in ("DB_USER", "DB_PASSWORD", "MFS_SECRETS_FILE")
                                 if k in os.environ)


if __name__ == "__main__":
    SecretFlow()
