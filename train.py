"""
Everything around the model that every script shares: device choice, `--key=value` config parsing with
range checks, atomic checkpoints with exact resume, `run_key` (the one fingerprint deciding whether a
finished checkpoint can be reused), the optimizer and learning-rate schedule, and the small training loop
(data-parallel under torchrun).
"""
import contextlib
import ctypes
import dataclasses
from dataclasses import dataclass
import difflib
import functools
import inspect
import io
import hashlib
import json
import math
import os
import re
import signal
import socket
import random
import sys
import tempfile
import textwrap
import time
import tokenize
import types
import typing
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, ModelConfig


def available_devices():
    """The devices this machine can run on, e.g. ['cpu', 'cuda', 'cuda:0', 'cuda:1']."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu. Anything else must be a device torch knows (cpu, cuda:1, mps) and
    that exists here; otherwise a ValueError says which devices do."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    here = f"devices here: {', '.join(available_devices())} (or auto)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise ValueError(f"device {name!r} is not available: {why}; {here}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} is not available: there are {torch.cuda.device_count()} GPUs; {here}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} is not available: torch sees no MPS device; {here}")
    return name


# --- config parsing: `python x.py --preset=paper --lr=3e-4` -------------------------------------

_UNIONS = (typing.Union, types.UnionType)


def _auto(s):
    """A field whose type we cannot tell (default None, no usable annotation): int, else float, else str."""
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _convert(s, typ, default):
    """Parse the command-line string s for a field annotated `typ` (typing.Any = unknown) with this default."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if s == "None":
        # nanoGPT's configurator rejected None defaults (its PR #156); here a None default means "may be None"
        if default is None or (origin in _UNIONS and type(None) in args):
            return None
        raise ValueError("None is allowed only for Optional fields and fields whose default is None")
    if origin in _UNIONS:                                       # Optional[X] parses as X; wider unions by guess
        rest = [a for a in args if a is not type(None)]
        typ = rest[0] if len(rest) == 1 else typing.Any
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is typing.Any and default is not None and default is not dataclasses.MISSING:
        typ, origin, args = type(default), None, ()
    if typ is typing.Any:
        return _auto(s)
    if typ is bool:
        if s.lower() in ("true", "1", "yes"):
            return True
        if s.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected a bool: true/false/1/0/yes/no")
    if typ is int:
        try:
            return int(s)
        except ValueError:
            f = float(s)                                        # 1e4 is a fine way to write 10000 steps
            if not f.is_integer():
                raise ValueError(f"expected an int, got {s!r}") from None
            return int(f)
    if typ in (tuple, list) or origin in (tuple, list):
        parts = [p.strip() for p in s.strip().strip("()[]").split(",")]
        if parts and not parts[-1]:                             # "()" and the trailing comma of "(5,)"
            parts.pop()
        if "" in parts:                                         # 0,,1 is a typo, not 0,1
            raise ValueError(f"empty element in {s!r}")
        if args and args[-1] is not Ellipsis and origin is tuple:   # tuple[float, float]: fixed length
            if len(args) != len(parts):
                raise ValueError(f"expected {len(args)} comma-separated values, got {len(parts)}")
            el = list(args)
        elif args:                                              # tuple[int, ...], list[int]
            el = [args[0]] * len(parts)
        elif default and len(default) == len(parts):            # bare `tuple`: follow the default's elements
            el = [type(d) for d in default]
        elif default and len({type(d) for d in default}) == 1:
            el = [type(default[0])] * len(parts)
        else:
            el = [typing.Any] * len(parts)
        vals = [_convert(p, t, dataclasses.MISSING) for p, t in zip(parts, el)]
        return tuple(vals) if tuple in (typ, origin) else vals
    return typ(s)                                               # float, str, or any class built from a string


def parse_config(ConfigClass, argv=None, presets=None):
    """
    Build a ConfigClass (a dataclass whose defaults are the CPU setting) from `--preset=NAME --key=value ...`.
    The preset's overrides apply first wherever --preset stands, then each --key=value, converted to the
    field's type (bool, int, float, str, tuples/lists like 0.9,0.95 or (0.9,0.95), None for Optional fields).
    presets defaults to the PRESETS dict of the module that defines ConfigClass. If ConfigClass has a field
    `preset`, it records the preset's name. Unknown keys or presets, malformed arguments and bad values exit
    with status 2 and a message listing the valid keys; --help prints them with their defaults and exits 0.
    Range checks live in the Config's __post_init__ (see check()): a value out of range also exits with 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if presets is None:
        presets = getattr(sys.modules.get(ConfigClass.__module__), "PRESETS", None) or {}
    MISSING = dataclasses.MISSING
    defaults = {f.name: f.default if f.default is not MISSING else
                f.default_factory() if f.default_factory is not MISSING else MISSING
                for f in dataclasses.fields(ConfigClass)}
    try:
        hints = typing.get_type_hints(ConfigClass)
    except Exception:                                           # unresolvable string annotations: use the defaults
        hints = {}
    hints = {k: (typing.Any if isinstance(v, str) or v is object else v) for k, v in hints.items()}

    script = os.path.basename(sys.argv[0] or "script")

    def usage():
        lines = [f"usage: python {script} [--preset=NAME] [--key=value ...]",
                 f"presets: {', '.join(presets) if presets else '(none)'}", "keys (default): meaning"]
        w = max((len(k) for k in defaults), default=0)
        notes = _field_comments(ConfigClass)
        for k, v in defaults.items():
            d = "(required)" if v is MISSING else repr(v)
            lines.append(f"  --{k:<{w}}  {d}" + (f": {notes[k]}" if notes.get(k) else ""))
        return "\n".join(lines)

    def fail(msg):
        # the error is the last line on screen (no key list after it to scroll past); --help has the keys
        print(f"usage: python {script} [--preset=NAME] [--key=value ...]   (--help: every key, default and meaning)\n"
              f"error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    preset, overrides = None, {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            fail(f"malformed argument {arg!r}: expected --key=value")
        key, val = arg[2:].split("=", 1)
        key = key.replace("-", "_")                             # --max-steps works like --max_steps
        if key == "preset":
            if preset is not None:
                fail("--preset given twice")
            if val not in presets:
                fail(f"unknown preset {val!r}; presets: {', '.join(presets) if presets else '(none)'}")
            preset = val
            continue
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            fail(f"unknown key {key!r}" + (f" (did you mean --{close[0]}?)" if close else "")
                 + f"; valid keys: {', '.join(defaults)}")
        if key in overrides:
            fail(f"--{key} given twice")
        try:
            overrides[key] = _convert(val, hints.get(key, typing.Any), defaults[key])
        except (ValueError, TypeError, SyntaxError) as e:
            fail(f"bad value for --{key}: {val!r} ({e})")
    values = dict(presets[preset]) if preset is not None else {}
    unknown = [k for k in values if k not in defaults]
    if unknown:
        fail(f"preset {preset!r} sets unknown keys {unknown}")
    values.update(overrides)
    if preset is not None and "preset" in defaults and "preset" not in overrides:
        values["preset"] = preset
    try:
        cfg = ConfigClass(**values)
    except (TypeError, ValueError) as e:                        # missing required fields, __post_init__ checks
        fail(str(e))
    try:
        _common_rules(cfg)
    except ValueError as e:
        fail(str(e))
    return cfg


def _common_rules(cfg):
    """Rules every script's Config shares, checked at parse time: seeds are distinct non-negative integers
    (--seeds=0,0 would report one seed twice with std 0), a seed is non-negative, and out_dir is a directory or
    can be made one (checked now, not after the first model has trained)."""
    seeds = getattr(cfg, "seeds", None)
    if isinstance(seeds, (tuple, list)):
        bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:
            raise ValueError(f"seeds={tuple(seeds)!r} is not valid: seeds must be non-negative integers (bad: {bad})")
        dup = sorted({s for s in seeds if list(seeds).count(s) > 1})
        if dup:
            raise ValueError(f"seeds={tuple(seeds)!r} is not valid: seeds must be distinct (repeated: {dup})")
    seed = getattr(cfg, "seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
        raise ValueError(f"seed={seed} is out of range: seed must be in [0, inf)")
    out_dir = getattr(cfg, "out_dir", None)
    if isinstance(out_dir, str) and out_dir:
        problem = out_dir_problem(out_dir)
        if problem:
            raise ValueError(f"out_dir={out_dir!r} is not usable: {problem}")


class OutDirInUse(RuntimeError):
    """Another live run holds the output directory's lock."""


class InputError(ValueError):
    """An input file that exists but does not fit this run (e.g. results of another config): the message names
    the file and what is wrong."""


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """Hold out_dir/.lock for the length of a run, so two runs never write the same results.json and checkpoints
    at once. The file names its holder (pid, host, command, start time); a lock whose process is gone (killed,
    machine rebooted) is taken over. Under torchrun only rank 0 locks. Raises OutDirInUse naming the holder."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": " ".join(sys.argv),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}
            alive = held.get("host") == me["host"] and _pid_alive(held.get("pid"))
            if alive or (held.get("host") not in (None, me["host"])):
                raise OutDirInUse(f"out_dir {out_dir} is in use by another run (pid {held.get('pid')} on "
                                  f"{held.get('host')}, started {held.get('started')}: {held.get('argv')}); wait "
                                  f"for it or pass another --out_dir (delete {path} if that run is gone)") from None
            os.remove(path)                                     # a stale lock: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _pid_alive(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cli(main):
    """Run a script's main() from the command line: a damaged checkpoint or cache, a missing input file, or an
    out_dir another run holds, ends as one line `error: ...` and exit status 1 (no traceback: the message says what to do); Ctrl-C
    as one line saying that the same command resumes (checkpoints are written atomically)."""
    keep_freed_memory()                     # (run_jobs' workers too)
    try:
        main()
    except (CheckpointError, OutDirInUse, InputError, FileNotFoundError) as e:   # messages name the file and fix
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


@contextlib.contextmanager
def stop_on_sigterm():
    """Within the block, SIGTERM (kill, a job scheduler's stop) raises KeyboardInterrupt as Ctrl-C does, so the
    same cleanup runs (worker processes stopped, no half-written files: checkpoints are atomic)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:                      # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def keep_freed_memory():
    """Let glibc (Linux) keep freed memory for the next allocation. By default it unmaps every freed block over
    32 MB and maps the next one anew, zero-filled page by page: evaluation batches' activations and logits are such
    blocks, and the page faults took 12-25% of an evaluation's CPU time (memsinks.py, locprobe.py). Where the
    memory comes from changes no number (torch aligns every tensor alike). cli sets it for every script run from
    the command line, and run_jobs for each of its workers."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc: leave the allocator as it is
        return
    libc.mallopt(-4, 0)          # M_MMAP_MAX = 0: large blocks from the heap, not from fresh mappings ...
    libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: ... and up to 1 GiB of freed heap kept for reuse


def cpu_seconds():
    """CPU seconds of this process and of its finished child processes (run_jobs' workers once the pool is
    shut down): what a run cost in all, for its report."""
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def side_by_side(workers, device):
    """How many worker processes a script may run at once: `workers` on a CPU; 1 on an accelerator (the workers
    would share the one device, each with a context and model copies of its own) and under torchrun (every rank
    must take the same steps)."""
    if pick_device(device) != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    return workers


def run_jobs(fn, jobs, workers, after=None):
    """[fn(*job) for job in jobs], in up to `workers` processes side by side (1: in this process, in order).
    Workers are spawned, not forked (safe with CUDA and torch's thread pools); fn must be a module-level function
    and each job's arguments picklable. Ctrl-C or SIGTERM stops every worker now (their caches resume a rerun).
    after: {i: indices of the jobs that job i needs finished first (they come before it in the list)}; a free
    worker takes the first job in list order whose needs are met."""
    with jobs_in_background(fn, jobs, workers, after) as results:
        return results()


@contextlib.contextmanager
def jobs_in_background(fn, jobs, workers, after=None):
    """run_jobs with this process free meanwhile: the workers start at once, and the block gets a function that
    waits for them and returns [fn(*job) for job in jobs]. Leaving the block waits for them too; an error or
    Ctrl-C in it stops them. With one worker the jobs run in this process when the results are asked for."""
    after = {i: set(need) for i, need in (after or {}).items()}
    if any(j >= i for i, need in after.items() for j in need):
        raise ValueError(f"run_jobs: a job can only wait for jobs before it in the list, got after={after}")
    n = min(workers, len(jobs))
    if n <= 1:
        yield lambda: [fn(*job) for job in jobs]
        return
    import multiprocessing
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=keep_freed_memory)
    pending, running, done, failed, stopped = list(range(len(jobs))), {}, {}, [], []
    # submitting starts the workers (in submit itself, with spawn); the lock makes "stop" and "submit" exclusive, so
    # once stopped, no worker starts that the terminate sweep below would miss (it would run its job to the end and
    # hold up this process's exit: an error or Ctrl-C in the first moments of the block did that)
    submitting = threading.Lock()

    def schedule():               # a thread of this process: a free worker takes the first job whose needs are met
        try:
            while (pending or running) and not failed:
                with submitting:
                    if stopped:
                        return
                    for i in [i for i in pending if after.get(i, set()) <= done.keys()][:n - len(running)]:
                        pending.remove(i)
                        running[pool.submit(fn, *jobs[i])] = i
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in finished:
                    done[running.pop(f)] = f.result()
        except BaseException as e:    # re-raised in this process's main thread by results()
            failed.append(e)
    thread = threading.Thread(target=schedule, daemon=True)

    def results():
        thread.join()
        if failed:
            raise failed[0]
        return [done[i] for i in range(len(jobs))]
    try:
        with stop_on_sigterm():            # SIGTERM like Ctrl-C: both reach the workers, not only this process
            thread.start()
            yield results
            results()                      # a block that never asked: its jobs still run, their errors surface
    except BaseException:
        with submitting:
            stopped.append(True)
            pool.shutdown(wait=False, cancel_futures=True)
        for proc in multiprocessing.active_children():
            proc.terminate()
        raise
    pool.shutdown()


class Prefixed:
    """A text stream that writes each line to `stream` after `prefix`: a worker's output, told apart from its
    siblings' (with contextlib.redirect_stdout)."""

    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.part = stream, prefix, ""

    def write(self, s):
        *lines, self.part = (self.part + s).split("\n")
        for line in lines:
            self.stream.write(self.prefix + line + "\n")
        self.stream.flush()
        return len(s)

    def flush(self):
        self.stream.flush()


def out_dir_problem(path):
    """Why `path` cannot be an output directory ('' if it can): it is a file, or the nearest existing folder
    on its way is not writable."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        return "it is a file, not a directory"
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not os.path.isdir(p):
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return ""


def _field_comments(ConfigClass):
    """{field: its comment in the class source} for --help: the comment on the field's own line, else the
    comment lines right above it. {} when the source is not available (e.g. a class built at run time)."""
    try:
        src = textwrap.dedent(inspect.getsource(ConfigClass))
    except (OSError, TypeError):
        return {}
    comments, lines = {}, src.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    names = {f.name for f in dataclasses.fields(ConfigClass)}
    out = {}
    for i, line in enumerate(lines, 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in out:
            continue
        if i in comments:
            out[m.group(1)] = comments[i]
            continue
        above, j = [], i - 1
        while j in comments and lines[j - 1].lstrip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[m.group(1)] = " ".join(above)
    return out


_INTERVAL = re.compile(r"^\s*([(\[])\s*([^,]+?)\s*,\s*([^,]+?)\s*([)\]])\s*$")


def _end(text, cfg):
    """One end of an interval rule: a number, inf, -inf, or the name of another field of cfg."""
    try:
        return float(text)
    except ValueError:
        if not hasattr(cfg, text):
            raise ValueError(f"bad range end {text!r}: a number, inf, or a field name") from None
        return getattr(cfg, text)


def check(cfg, **rules):
    """
    Valid ranges of a script's Config, called from its __post_init__: raises ValueError naming the first field
    outside its range (parse_config turns it into exit status 2). A rule is an interval "(0, 1]", "[1, inf)"
    whose ends are numbers, inf or the names of other fields ("[1, n_pool]"), or a tuple of the allowed values.
    Tuple- and list-valued fields are checked element by element against an interval.
        check(self, p="(0, 1]", n_layer="[1, inf)", setting=("repetition", "canary"))
    """
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if isinstance(rule, (tuple, list, set, frozenset)):
            if value not in rule:
                raise ValueError(f"{name}={value!r} is not valid: {name} must be one of "
                                 f"{', '.join(repr(r) for r in rule)}")
            continue
        m = _INTERVAL.match(rule)
        if m is None:
            raise ValueError(f"bad rule {rule!r} for {name}: write an interval such as (0, 1] or [1, inf)")
        lo_br, lo_t, hi_t, hi_br = m.groups()
        lo, hi = _end(lo_t, cfg), _end(hi_t, cfg)
        shown = f"{lo_br}{lo_t}, {hi_t}{hi_br}"
        if any(hasattr(cfg, t) for t in (lo_t, hi_t)):                  # say what a field-name end stands for
            shown += f" = {lo_br}{lo:g}, {hi:g}{hi_br}"
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and \
                (lo < v if lo_br == "(" else lo <= v) and (v < hi if hi_br == ")" else v <= hi)
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range: {name} must be in {shown}")


# --- checkpoints --------------------------------------------------------------------------------

def unwrap(model):
    """The plain module inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers.
    Saving the unwrapped module keeps `module.` / `_orig_mod.` prefixes out of checkpoints (nanoGPT #325)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _as_dict(config):
    if config is None or isinstance(config, dict):
        return config
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"config must be a dataclass or a dict, got {type(config).__name__}")


def rng_state():
    """Every global RNG a run draws from: python, numpy, torch CPU and (when present) CUDA."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), *rest), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())                  # map_location may have moved it to the GPU
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path, model, optimizer=None, step=0, config=None, tokenizer=None, extra=None):
    """
    Write {model, model_config, optimizer, step, config, tokenizer, extra, rng} to `path` atomically: the
    bytes go to a temp file in the same directory (same file system, so the rename is atomic), are fsynced,
    then os.replace'd over the old file. A crash mid-write leaves the previous checkpoint untouched.
    tokenizer is a dict (tokenizer.state_dict()); config a dataclass or dict (the run's Config).
    """
    raw = unwrap(model)
    mcfg = getattr(raw, "cfg", None)
    ckpt = {"model": raw.state_dict(), "model_config": _as_dict(mcfg) if dataclasses.is_dataclass(mcfg) else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": int(step),
            "config": _as_dict(config), "tokenizer": tokenizer, "extra": extra, "rng": rng_state()}
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                          # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:                                       # includes Ctrl-C: never leave a half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path, device="cpu", weights_only=True, **load_kw):
    """The dict save_checkpoint wrote, tensors on `device`. weights_only=True refuses arbitrary pickled
    objects (everything save_checkpoint writes itself loads this way); pass False for trusted files whose
    tokenizer/config/extra hold other Python objects. Every member's CRC-32 is checked before torch.load
    (torch.load itself does not: a flipped byte inside a tensor loads silently), ~0.1 s per 100 MB;
    a damaged file raises CheckpointError naming it. load_kw go to torch.load (e.g. mmap=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    bad = _damaged(path)
    if bad:
        raise CheckpointError(f"checkpoint {path} is damaged ({bad}). Delete it and run again: training starts "
                              f"over from step 0.")
    try:
        return torch.load(path, map_location=device, weights_only=weights_only, **load_kw)
    except Exception as e:
        if _damaged(path):   # changed between the check and the load
            raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupt; torch.load said: "
                                  f"{type(e).__name__}: {str(e)[:200]}). Delete it and run again: training "
                                  f"starts over from step 0.") from e
        raise


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read: the message names it and says to delete it."""


def _damaged(path):
    """What is wrong with the zip archive torch.save wrote ('' when nothing): no zip at all (truncated,
    overwritten) or a member whose bytes fail their CRC-32 (a flipped bit, a copy cut short)."""
    try:
        with zipfile.ZipFile(path) as z:
            member = z.testzip()
        return f"member {member} fails its CRC-32 check" if member is not None else ""
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        return f"not a readable zip archive, truncated or corrupt: {type(e).__name__}: {str(e)[:120]}"


def load_json(path):
    """A cache .json a run wrote (json.dump to a temp file, then os.replace); a file that is not valid JSON
    raises CheckpointError naming it and what to do, instead of a bare JSONDecodeError."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cache file {path} is damaged (not valid JSON: {e}). Delete it and run again: "
                              f"the step that wrote it runs again.") from e


def model_from_checkpoint(ckpt, device="cpu", setup=None):
    """Rebuild the GPT in ckpt (a dict from load_checkpoint, or a path). setup(model) runs before the weights
    are loaded, e.g. to attach the adapters whose weights the checkpoint also holds (loading is strict)."""
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = load_checkpoint(ckpt, device)
    if ckpt.get("model_config") is None:
        raise ValueError("checkpoint has no model_config: it was not saved from a GPT")
    model = GPT(ModelConfig(**{"gelu": "tanh", **ckpt["model_config"]}))   # saved before the field: tanh
    if setup is not None:
        setup(model)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


# --- run_key: when may a finished checkpoint be reused? ------------------------------------------

def _feed(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, dataclasses.asdict(obj))
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (set, frozenset)):
        _feed(h, sorted(obj, key=repr))
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:                                       # numbers, strings, None, bools: their JSON text (1 != 1.0 != True)
        h.update(json.dumps(obj, default=str).encode() + type(obj).__name__.encode() + b";")


def digest(obj):
    """16 hex digits of SHA-256 over tensors (dtype, shape, bytes), arrays, numbers, strings, dataclasses and
    nested dicts / lists / tuples of them. Stable across runs, processes and machines of the same endianness."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:16]


# Fields of TrainConfig that do not change the trained weights: how the run logs, checkpoints and where it runs.
# The device stays out on purpose: a model trained on a GPU (bf16 autocast) is reused on a CPU and vice versa.
# eval_every stays in: the checkpoint holds the evaluation history the scripts report as learning curves.
_NOT_TRAINING = ("log_every", "ckpt_every", "ckpt_path", "resume", "device")


def run_key(model_cfg, train_cfg, data=None, **settings):
    """
    The one fingerprint of what a training run receives; scripts name checkpoints by it, so a rerun that
    changes only evaluation settings reuses the finished model and a run that changes anything training sees
    trains afresh. 16 hex digits of:
      model_cfg  the ModelConfig (or its dict): architecture, and with the seed, the initialization;
      train_cfg  a TrainConfig (or anything as_train_config reads): every field except _NOT_TRAINING;
      data       what the batches are built from (tensors, token lists, dicts of them): its digest();
      settings   anything else the loop sees that neither holds: batch size, the data order's seed, mask
                 settings (p, g, n_source, ...). Pass only what the run uses, e.g. no mask settings for a
                 standard model, so a sweep over p reuses the standard model.
    """
    tc = dataclasses.asdict(as_train_config(train_cfg))
    mc = _as_dict(model_cfg)
    if mc is not None and mc.get("gelu") == "tanh":    # the form before ModelConfig.gelu existed: its keys stay valid
        mc = {k: v for k, v in mc.items() if k != "gelu"}
    return digest({"model": mc, "train": {k: v for k, v in tc.items() if k not in _NOT_TRAINING},
                   "data": digest(data), "settings": settings})


# --- caches named by run_key: trained models and finished results ------------------------------

def ckpt_path(out_dir, name, key):
    """out_dir/ckpt/<name>-<key>.pt: where a model trained by train_cached is kept, key = its run_key."""
    return os.path.join(out_dir, "ckpt", f"{name}-{key}.pt")


def check_run_key(path, key):
    """A cached model at `path` (named by `key`) must hold that key (as the file's "run_key", or as its config's
    for train() checkpoints): a file renamed or copied in from another run is an error, never a stale model
    silently reused. A file that records no key (written before keys were stored) is taken at its name. Reads
    only the key (a memory-mapped, weights-only load)."""
    if not os.path.exists(path):
        return
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ck = load_checkpoint(path)               # says whether the file is damaged and what to do about it
    got = ck.get("run_key", (ck.get("config") or {}).get("run_key"))
    if got is not None and got != key:
        raise ValueError(f"{path} holds a model trained for run key {got}, not for {key} (what this run's "
                         f"training receives): delete the file to train it again")


def train_cached(model, batches, cfg, key, **train_kw):
    """train() cached at cfg.ckpt_path, a file named by `key` (the run_key of what the training receives) that
    stores it: a file of another run there is an error (check_run_key), a finished one is reused, an interrupted
    one resumes. The side file <ckpt>.time.json records the run that trained the model, so a reuse reports that
    run's time. Returns (history, {wall_s, cpu_s, steps, final_loss, cached})."""
    tc = dataclasses.replace(as_train_config(cfg), resume=True)
    check_run_key(tc.ckpt_path, key)
    t0, c0 = time.time(), time.process_time()
    hist = train(model, batches, dict(dataclasses.asdict(tc), run_key=key), **train_kw)   # the key goes into the file
    info = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "steps": tc.max_steps,
            "final_loss": hist["loss"][-1] if hist["loss"] else None, "cached": False}
    side = tc.ckpt_path + ".time.json"
    if hist["start_step"] == 0 and is_main_process():
        with open(side, "w") as f:
            json.dump(info, f)
    elif hist["start_step"] >= tc.max_steps and os.path.exists(side):
        info = dict(load_json(side), cached=True)
    return hist, info


def seed_config(cfg, seed, **changes):
    """The Config of one seed of an over-seeds run (every script builds them here): cfg with seed=seed and any other
    changes (its own out_dir, ...), checked again by the Config's __post_init__."""
    return dataclasses.replace(cfg, seed=seed, **changes)


def cached(out_dir, key, fn):
    """fn() -> a json-able dict, stored under out_dir/cache/<key>.json (written atomically), so a rerun or an
    interrupted run reads it back instead of calling fn again."""
    path = os.path.join(out_dir, "cache", f"{key}.json")
    if os.path.exists(path):
        return load_json(path)
    out = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, default=float)
    os.replace(path + ".tmp", path)
    return out


# --- optimizer and schedule ---------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), extra_groups=(), row_dims=None):
    """
    AdamW. Default groups: every trainable tensor with >= 2 dims (matmul weights and, as in nanoGPT, the
    embeddings) decays; biases, norm gains and other 1-D tensors do not. extra_groups: dicts with "params"
    and optionally "lr", "weight_decay", "constant_lr" (True = the schedule leaves this group at its lr, e.g.
    memory values: no decay, constant lr), "name", or any other AdamW group option. Their parameters are
    taken out of the default groups; a parameter in two groups is an error. Every group gets "base_lr",
    the lr the schedule scales. row_dims: {parameter: dim} makes it a LazyRowAdamW in which those parameters'
    slices along dim update only on steps whose gradient touches them (NULLs' sinks; see LazyRowAdamW).
    """
    taken, groups = set(), []
    for g in extra_groups:
        g = dict(g)
        ps = g.pop("params")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in ps:
            if id(p) in taken:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in two optimizer groups")
            taken.add(id(p))
        groups.append({"name": f"extra{len(groups)}", **g, "params": ps})
    rest = [p for p in unwrap(model).parameters() if p.requires_grad and id(p) not in taken]  # tied weights once
    groups = [{"name": "decay", "params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}] + groups
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    for g in groups:
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", weight_decay)
        g.setdefault("constant_lr", False)
        g["base_lr"] = g["lr"]
    if row_dims:
        dims = {id(p): d for p, d in row_dims.items()}
        split = []
        # each group's row-sparse tensors in a group of their own dim and row count (they share one row index)
        key = lambda p: (-1, 0) if id(p) not in dims else (dims[id(p)], p.shape[dims[id(p)]])
        for g in groups:
            for k in sorted({key(p) for p in g["params"]}):
                ps = [p for p in g["params"] if key(p) == k]
                split.append({**g, "params": ps, "row_dim": None if k[0] < 0 else k[0],
                              "name": g["name"] + ("" if k[0] < 0 else f"/rows{k[0]}:{k[1]}")})
        if len({id(p) for g in split for p in g["params"]} & set(dims)) != len(dims):
            raise ValueError("make_optimizer: a row_dims parameter is not a trainable parameter of the model")
        return LazyRowAdamW(split, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return AdamW(groups, lr=lr, betas=tuple(betas), fused=True if on_cuda else None)


class AdamW(torch.optim.AdamW):
    """
    torch's AdamW, bit for bit, without a slow path of CPUs: sqrt of an exact zero takes ~6x the time of other
    values on this repo's machines (AMD EPYC, AVX-512) and of a denormal ~40x, and second moments are exactly zero
    wherever a gradient never was (NULLs' sinks no source switched on, embedding rows of unseen tokens) or decay into
    denormals where it stopped. Where we differ from torch's code: the denominator sqrt(v) / sqrt(1 - beta2^t) + eps
    is computed from max(v, 1e-36). For v < 1e-36 the first term is < 1e-18 / sqrt(1 - beta2), under half an ulp of
    eps, so the sum rounds to eps either way (the step checks that bound for the parameter's dtype; where it fails,
    e.g. eps = 0 or float64, the plain sqrt). The rest is torch's for-loop AdamW (what the CPU runs), operation by
    operation; anything else (CUDA's fused kernel, foreach, amsgrad, maximize, complex parameters, a closure) is
    torch's own step. Tested equal to torch.optim.AdamW (tests/test_train.py).
    """
    TINY = 1e-36

    def _plain(self, closure):
        return closure is not None or any(
            g["fused"] or g["foreach"] or g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]
            or any(p.device.type != "cpu" or p.is_complex() for p in g["params"]) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        if self._plain(closure):
            return super().step(closure)
        for g in self.param_groups:
            ps, grads, ms, vs, steps = [], [], [], [], []
            self._init_group(g, ps, grads, ms, vs, [], steps)           # torch's lazy state, its layout
            (b1, b2), lr, wd, eps = g["betas"], g["lr"], g["weight_decay"], g["eps"]
            for p, grad, m, v, t in zip(ps, grads, ms, vs, steps):
                t += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step = t.item()
                bc2_sqrt = (1 - b2 ** step) ** 0.5
                # half an ulp of eps is >= eps * finfo.eps / 4; a factor 2 more covers the float rounding of the bound
                if eps > 0 and math.sqrt(self.TINY) / bc2_sqrt < eps * torch.finfo(p.dtype).eps / 8:
                    denom = v.clamp_min(self.TINY).sqrt_().div_(bc2_sqrt).add_(eps)
                else:
                    denom = (v.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-(lr / (1 - b1 ** step)))
        return None


class LazyRowAdamW(torch.optim.Optimizer):
    """
    AdamW that updates only the rows a step's gradient touched, for tensors whose rows are switched on sparsely
    (NULLs' sink neurons: a source's inactive sinks get exactly zero gradient). A group with "row_dim": d treats
    the slices along dim d (0 or the last dim; every tensor of the group as long there) as rows, row i of all the
    group's tensors as one unit (a neuron: its up and gate rows, or its down columns). A row whose gradient is all
    zero in every tensor of the group this step is left exactly as it is (no moment decay, no weight decay, no
    step count; a tensor without a gradient counts as all zero) and each row keeps its own step count for bias
    correction. Groups without row_dim are dense: every row is active every step, which is torch.optim.AdamW's
    update.
    The semantic difference from dense AdamW, on purpose: an inactive row neither decays nor drifts on its old
    momentum; dense AdamW moves it on both. A row active at every step gets AdamW's update exactly.
    Speed: the moments of a row group are one (rows, sum of the tensors' row sizes) buffer each, held in the
    state of the group's first tensor, so a step's active rows of all its tensors are one index_select and one
    index_copy_ of long contiguous rows; the gradient and weight rows are gathered into scratch buffers reused
    across steps, updated there in one pass per AdamW operation, and written back. Inactive rows (~3/4 of NULLs'
    sinks at the paper's ratio) are read once, to find that their gradient is zero (not at all after expect_rows),
    and never written.
    """
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, row_dim=None))
        for g in self.param_groups:
            d = g["row_dim"]
            if d is not None and (any(d not in (0, p.dim() - 1) for p in g["params"]) or
                                  len({(p.shape[d], p.dtype, p.device) for p in g["params"]}) != 1):
                raise ValueError(f"LazyRowAdamW: a group with row_dim={d} needs it to be the first or last dim of "
                                 f"every tensor, all as long there (one row index for all), of one dtype and device")
        self._scratch = None      # reused across steps; not state (nothing in it outlives a step)
        self._expected = None     # expect_rows' promise for the next step

    def _buffers(self, ref, n, shape):
        s = self._scratch
        if s is None or s.numel() < n * math.prod(shape) or (s.dtype, s.device) != (ref.dtype, ref.device):
            s = self._scratch = torch.empty(n * math.prod(shape), dtype=ref.dtype, device=ref.device)
        return s[:n * math.prod(shape)].view(n, *shape).unbind(0)

    @staticmethod
    def _rows(x, d):
        """x as a (rows, row size) view: row_dim 0 as is, the last dim transposed."""
        return x.view(x.shape[0], -1) if d == 0 else x.view(-1, x.shape[-1]).t()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g["row_dim"] is None:
                for p in g["params"]:
                    if p.grad is not None:
                        self._dense_step(g, p)
            elif any(p.grad is not None for p in g["params"]):
                self._row_step(g)
        self._expected = None
        return loss

    def expect_rows(self, rows):
        """A promise for the next step(): rows outside `rows` (indices along row_dim, the same for every row group)
        have an all-zero gradient in every row-group tensor. NULLs: the hidden neurons the batch's sink masks switch
        on, the same in every layer. step() then reads only those rows of the gradients instead of all of them
        (same update); rows in `rows` without gradient still stay as they are. Calls before one step add up.
        A promise that leaves out a row with gradient drops that row's update: only the code that builds the
        masks can make it (not under DDP, where other ranks' masks add rows)."""
        rows = rows.reshape(-1)
        self._expected = torch.unique(rows if self._expected is None else torch.cat([self._expected, rows]))

    def _adamw(self, g, w, grad, m, v, tr, den, upd):
        """torch's AdamW update of w, m, v in place; tr: the rows' step counts (rows, 1) after this step."""
        b1, b2 = g["betas"]
        bc1, bc2 = ((1 - b ** tr).to(w.dtype) for b in (b1, b2))
        w.mul_(1 - g["lr"] * g["weight_decay"])                          # decoupled weight decay
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        torch.sqrt(v, out=den).div_(bc2.sqrt()).add_(g["eps"])
        w.sub_(torch.mul(g["lr"] / bc1, m, out=upd).div_(den))

    def _dense_step(self, g, p):
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros(1, dtype=torch.float64, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        st["step"] += 1
        den, upd = self._buffers(p, 2, p.shape)
        self._adamw(g, p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], den, upd)

    def _row_step(self, g):
        d, ps = g["row_dim"], g["params"]
        n_rows, sizes = ps[0].shape[d], [p.numel() // ps[0].shape[d] for p in ps]
        st = self.state[ps[0]]
        if not st:
            st["step"] = torch.zeros(n_rows, dtype=torch.float64, device=ps[0].device)
            st["exp_avg"] = ps[0].new_zeros(n_rows, sum(sizes))
            st["exp_avg_sq"] = ps[0].new_zeros(n_rows, sum(sizes))
        if st["exp_avg"].shape != (n_rows, sum(sizes)):       # e.g. a checkpoint of the per-tensor layout
            raise ValueError(f"LazyRowAdamW: state of shape {tuple(st['exp_avg'].shape)} for a row group of "
                             f"{n_rows} rows x {sum(sizes)}: not this layout")
        blocks = torch.tensor(sizes).cumsum(0).tolist()
        blocks = [slice(b - k, b) for b, k in zip(blocks, sizes)]

        def gather(idx, bufs, which):      # rows idx of each tensor's gradient or weight, side by side
            for p, b in zip(ps, blocks):
                x, out = (p.grad if which == 0 else p), bufs[which][:, b]
                if x is None:
                    out.zero_()
                elif d == 0:
                    torch.index_select(self._rows(x, 0), 0, idx, out=out)
                else:                      # a column gather of the tensor as stored, then transposed
                    out.copy_(x.view(-1, n_rows).index_select(1, idx).t())
        nonzero = lambda r: r.amax(1).ne(0) | r.amin(1).ne(0)     # two reads, no copy
        if self._expected is None:         # rows with a nonzero gradient in any tensor
            hot = None
            for p in ps:
                if p.grad is not None:
                    h = nonzero(self._rows(p.grad, d))
                    hot = h if hot is None else hot.logical_or_(h)
            idx = hot.nonzero().squeeze(1)
            bufs = self._buffers(ps[0], 6, (len(idx), sum(sizes)))
            gather(idx, bufs, 0)
        else:                              # only the promised rows can have gradient: read just those
            idx = self._expected
            bufs = self._buffers(ps[0], 6, (len(idx), sum(sizes)))
            gather(idx, bufs, 0)
            hot = nonzero(bufs[0])
            if not hot.all():              # promised rows whose gradient is zero stay as they are
                keep = hot.nonzero().squeeze(1)
                idx, rows = idx[keep], bufs[0][keep]
                bufs = self._buffers(ps[0], 6, (len(idx), sum(sizes)))
                bufs[0].copy_(rows)
        if idx.numel() == 0:
            return
        gather(idx, bufs, 1)
        grad, w, m, v, den, upd = bufs
        torch.index_select(st["exp_avg"], 0, idx, out=m)
        torch.index_select(st["exp_avg_sq"], 0, idx, out=v)
        tr = st["step"].index_select(0, idx) + 1
        self._adamw(g, w, grad, m, v, tr[:, None], den, upd)
        for p, b in zip(ps, blocks):
            self._rows(p, d).index_copy_(0, idx, w[:, b])
        st["exp_avg"].index_copy_(0, idx, m)
        st["exp_avg_sq"].index_copy_(0, idx, v)
        st["step"].index_copy_(0, idx, tr)


def lr_at(step, max_lr, warmup, total, min_lr):
    """Linear warmup to max_lr over the first `warmup` steps (step 0 already gets max_lr / warmup), then half
    a cosine from max_lr at step `warmup` down to min_lr at step `total`, and min_lr after it."""
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need total > 0 and 0 <= warmup <= total, got warmup={warmup}, total={total}")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# --- the shared training loop -------------------------------------------------------------------

@dataclass
class TrainConfig:
    lr: float = 1e-3
    min_lr: typing.Optional[float] = None   # None = lr / 10, the usual floor (nanoGPT, Chinchilla)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    max_steps: int = 1000
    grad_clip: float = 1.0                  # max global grad norm; 0 = off
    log_every: int = 10                     # progress line every N steps; 0 = none
    eval_every: int = 0                     # eval_fn runs every N steps and at the end; 0 = only at the end
    ckpt_every: int = 0                     # checkpoint every N steps and at the end; needs ckpt_path
    ckpt_path: typing.Optional[str] = None
    resume: bool = False                    # continue from ckpt_path when that file exists
    device: str = "auto"
    seed: int = 0


def as_train_config(cfg):
    """A TrainConfig from any object (a script's Config) or dict with some of its field names."""
    if isinstance(cfg, TrainConfig):
        return cfg
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
    return TrainConfig(**{f.name: get(f.name, f.default) for f in dataclasses.fields(TrainConfig)})


def is_main_process():
    """True except on the non-zero ranks of a torchrun launch (only rank 0 logs and writes files)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device="auto"):
    """Under torchrun (WORLD_SIZE > 1) join the process group once for a whole script (gloo on CPU, nccl on
    CUDA, one GPU per LOCAL_RANK), so that each train() call runs inside it; a no-op otherwise. Returns
    (rank, world). A script that trains several models calls this first and end_distributed() last."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dev = pick_device(device)
        if dev.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return rank, world


def end_distributed():
    if dist.is_initialized():
        dist.barrier()    # no rank tears down while another still talks to rank 0's store
        dist.destroy_process_group()


def epoch_batch(order, step):
    """Row indices of global step `step` of a run that walks through the epochs of `order` (a data.EpochIterator,
    not drop_last): a pure function of the step, so a resumed run sees exactly the batches the uninterrupted
    run saw, and a step -> batch callable for train() is a few lines around it."""
    epoch, pos = divmod(step, order.steps_per_epoch)
    return order.order(epoch)[pos * order.batch_size:(pos + 1) * order.batch_size]


def _reseed(seed, step, stream):
    # Everything random inside a step (batch sampling, dropout) is a function of (seed, step, stream): a
    # resumed run draws exactly what the uninterrupted run drew, whatever happened in between (evals, ...).
    s = ((seed * 1_000_003 + step) * 1024 + stream) % 2**63
    torch.default_generator.manual_seed(s)     # not torch.manual_seed: on CPU-only runs its lazy CUDA seeding
    if torch.cuda.is_initialized():            # costs more than a tiny model's whole step
        torch.cuda.manual_seed_all(s)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _shard(obj, B, rank, world, device):
    """Move a batch to device; with world > 1 keep this rank's contiguous slice of every tensor whose first
    dim is the global batch size B (recursing into dicts, lists, tuples; other objects pass unchanged)."""
    if isinstance(obj, torch.Tensor):
        if world > 1 and obj.dim() > 0 and obj.shape[0] == B:
            obj = obj[rank * B // world:(rank + 1) * B // world]
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _shard(v, B, rank, world, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_shard(v, B, rank, world, device) for v in obj)
    return obj


def _plain(v):
    # eval results go into checkpoints, which load with weights_only=True: plain Python numbers and lists only
    return v.tolist() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) else v


def _hms(sec):
    sec = int(round(sec))
    h, m, s = sec // 3600, sec // 60 % 60, sec % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _human(x):
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


_MODEL_KWARGS = ("doc_ids", "mlp_mask", "adapter_ctx")
_METADATA = ("source_ids",)    # data.py's per-token source labels: for masks and metrics, not a model input


def train(model, batches, cfg, *, optimizer=None, extra_groups=(), loss_fn=None, eval_fn=None, param_filter=None,
          tokenizer=None, log=print):
    """
    The small loop every script shares. Returns a history dict: loss and lr per step, eval results, wall
    time, tokens/s.

    model:   a GPT (or anything whose forward is model(x, y, **kw) -> (logits, loss)).
    batches: a callable step -> dict, or an iterator of dicts with state_dict()/load_state_dict() (needed when
             checkpointing). A dict holds the GLOBAL batch: x, y (shifted targets, -100 ignored) and optionally
             doc_ids / mlp_mask / adapter_ctx, passed to the model; under torchrun each rank keeps its own
             contiguous slice of every tensor whose first dim is the batch size (inside dicts/lists too);
             other objects (mask objects, adapter contexts) reach every rank whole, so per-row ones must be
             built from the shard: give a plain function local_batch -> value (it is called with this rank's
             slice, on the training device), or use a loss_fn. Keys other than these and source_ids need a
             loss_fn.
    cfg:     a TrainConfig, or a script's Config / dict read by field name (missing fields take the defaults).
    loss_fn: (model, batch) -> scalar loss for custom objectives; `model` may be DDP-wrapped, so call it (not
             its methods) for the forward pass, and use unwrap(model) for attributes. Under DDP its gradient
             is averaged over ranks. The default loss is the mean over all counted targets of the global batch.
    eval_fn: (model, step) -> dict, run on rank 0 in eval mode every eval_every steps and at the end.
    param_filter: (name, param) -> bool; parameters for which it is False are frozen (requires_grad=False).
    The global RNGs are reseeded from (seed, step) every step, so sampling in `batches` and dropout are
    reproducible; with cfg.resume a run continues from cfg.ckpt_path bit-identically (on CPU).
    """
    tc = as_train_config(cfg)
    is_iter = _check_loop_inputs(tc, batches)
    world, rank, device, own_group = _join_ranks(tc)     # data-parallel when launched by torchrun
    say = log if (rank == 0 and log is not None) else (lambda *a, **k: None)

    model = model.to(device)
    raw = unwrap(model)
    if param_filter is not None:
        for name, p in raw.named_parameters():
            p.requires_grad_(p.requires_grad and bool(param_filter(name, p)))
    opt = optimizer if optimizer is not None else make_optimizer(raw, tc.lr, tc.weight_decay, tc.betas, extra_groups)
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    params = [p for g in opt.param_groups for p in g["params"]]
    min_ratio = (tc.lr / 10 if tc.min_lr is None else tc.min_lr) / tc.lr
    start, history = _resume(tc, raw, opt, batches if is_iter else None, device, say)
    net = DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None) \
        if world > 1 else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    ntrain = sum(p.numel() for p in params)
    say(f"training {ntrain / 1e6:.2f}M params on {device}" + (f" x {world} ranks" if world > 1 else "") +
        f", steps {start}..{tc.max_steps}")

    pending, tokens = [], 0
    t0 = t_log = time.time()
    tok_log = 0

    def flush():                       # per-step losses stay on the device until needed (no sync every step)
        if pending:
            history["loss"] += torch.stack(pending).float().cpu().tolist()
            pending.clear()

    net.train()
    for step in range(start, tc.max_steps):
        f = lr_at(step, 1.0, tc.warmup_steps, tc.max_steps, min_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] if g.get("constant_lr") else g["base_lr"] * f
        _reseed(tc.seed, step, 0)                      # the global batch: identical on every rank
        batch = next(batches) if is_iter else batches(step)
        _reseed(tc.seed, step, 1 + rank)               # dropout & co: independent across ranks
        B = batch["x"].shape[0]
        if B % world:
            raise ValueError(f"global batch size {B} does not divide by the {world} ranks")
        tokens += batch["x"].numel()
        local = _shard(batch, B, rank, world, device)
        with autocast:
            loss, report = _batch_loss(net, batch, local, loss_fn, world, device)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(report)                    # sum of the shares = the global-batch loss
        pending.append(report)
        history["lr"].append(tc.lr * f)
        done = step + 1
        last = done == tc.max_steps

        if tc.log_every and (done % tc.log_every == 0 or last):
            flush()
            now = time.time()
            tps = (tokens - tok_log) / max(now - t_log, 1e-9)
            eta = (now - t0) / (done - start) * (tc.max_steps - done)
            say(f"step {done}/{tc.max_steps} | loss {history['loss'][-1]:.3f} | lr {tc.lr * f:.1e} | "
                f"{_human(tps)} tok/s | eta {_hms(eta)}")
            t_log, tok_log = now, tokens
        if eval_fn is not None and rank == 0 and ((tc.eval_every and done % tc.eval_every == 0) or last):
            history["eval"].append(_evaluate(eval_fn, raw, net, opt, done, say))
        if tc.ckpt_path and ((tc.ckpt_every and done % tc.ckpt_every == 0) or last):
            flush()
            if rank == 0:
                run_cfg = cfg if dataclasses.is_dataclass(cfg) or isinstance(cfg, dict) else None
                save_checkpoint(tc.ckpt_path, raw, opt, done, config=run_cfg, tokenizer=tokenizer,
                                extra={"history": history, "data": batches.state_dict() if is_iter else None})

    flush()
    wall = time.time() - t0
    history.update(wall_time=wall, tokens_per_s=tokens / max(wall, 1e-9), start_step=start, steps=tc.max_steps)
    if own_group:
        dist.barrier()    # no rank tears down while another still talks to rank 0's store
        dist.destroy_process_group()
    return history


def _evaluate(eval_fn, raw, net, opt, done, say):
    """eval_fn on the unwrapped model in eval mode, back to training after it; the record for history["eval"]."""
    raw.eval()
    res = {k: _plain(v) for k, v in eval_fn(raw, done).items()}
    net.train()
    opt.zero_grad(set_to_none=True)            # in case the eval computed gradients
    say(f"eval step {done} | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in res.items()))
    return {"step": done, **res}


def _check_loop_inputs(tc, batches):
    """Refuse settings and data sources the loop cannot run or resume exactly; True when batches is an iterator."""
    if tc.lr <= 0 or tc.max_steps <= 0 or not 0 <= tc.warmup_steps <= tc.max_steps:
        raise ValueError(f"need lr > 0, max_steps > 0 and 0 <= warmup_steps <= max_steps, got lr={tc.lr}, "
                         f"max_steps={tc.max_steps}, warmup_steps={tc.warmup_steps}")
    is_iter = hasattr(batches, "__next__")
    if not is_iter and not callable(batches):
        raise TypeError("batches must be a callable step -> dict or an iterator of dicts")
    if tc.ckpt_path and is_iter and not hasattr(batches, "state_dict"):
        raise TypeError("checkpoints of a run fed by an iterator need its state_dict()/load_state_dict() to "
                        "resume exactly; give the iterator those, or pass a callable step -> batch")
    return is_iter


def _join_ranks(tc):
    """(world, rank, device, own_group): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; a process
    group is created here unless the script already made one (then the script also ends it)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(tc.device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world, rank, device, own_group


def _resume(tc, raw, opt, iterator, device, say):
    """(start step, history): from tc.ckpt_path when resuming and it exists (model, optimizer, the data iterator's
    position, every RNG: the run continues bit-identically), else step 0 and an empty history."""
    history = {"loss": [], "lr": [], "eval": []}
    if not (tc.resume and tc.ckpt_path and os.path.exists(tc.ckpt_path)):
        if tc.resume:
            say(f"no checkpoint at {tc.ckpt_path}: starting from step 0")
        return 0, history
    ck = load_checkpoint(tc.ckpt_path, device)
    extra = ck.get("extra") or {}
    if ck.get("optimizer") is None or (iterator is not None and extra.get("data") is None):
        raise ValueError(f"{tc.ckpt_path} lacks the optimizer or data state an exact resume needs "
                         "(was it written by train()?)")
    raw.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if iterator is not None:
        iterator.load_state_dict(extra["data"])
    set_rng_state(ck["rng"])
    say(f"resumed from {tc.ckpt_path} at step {ck['step']}")
    return ck["step"], extra.get("history", history)


def _batch_loss(net, batch, local, loss_fn, world, device):
    """(loss to backpropagate, the global batch's loss to report) for this rank's rows `local` of `batch`."""
    if loss_fn is not None:
        loss = loss_fn(net, local)
        return loss, loss.detach() / world
    unknown = set(local) - {"x", "y", *_MODEL_KWARGS, *_METADATA}
    if unknown:
        raise ValueError(f"batch keys {sorted(unknown)} are not model inputs: pass a loss_fn that uses them")
    kw = {k: local[k] for k in _MODEL_KWARGS if k in local}
    kw = {k: v(local) if isinstance(v, (types.FunctionType, functools.partial)) else v
          for k, v in kw.items()}                   # built from this rank's rows (see batches)
    if world == 1:
        _, loss = net(local["x"], local["y"], **kw)
        return loss, loss.detach()
    # DDP averages gradients over ranks, but shards can count different numbers of targets (-100s). Sum this
    # shard's losses over the global count, times world: the average over ranks is then exactly the gradient of
    # the global-batch mean.
    logits, _ = net(local["x"], **kw)
    n_all = (batch["y"] != -100).sum().clamp(min=1).to(device)
    total = F.cross_entropy(logits.float().flatten(0, 1), local["y"].flatten(), ignore_index=-100, reduction="sum")
    return total * world / n_all, total.detach() / n_all
