import signal

if hasattr(signal, "pthread_sigmask"):  # an interrupt during start-up waits for cli.run's handler
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from precompile.cli import run  # noqa: E402

run()
