/**
 * Where a migration stream goes: a file that appears atomically once committed, or a FIFO that a
 * waiting QEMU loads while we write. Writes are sequential; a FIFO write resolves when QEMU took
 * the bytes, so a slow QEMU slows the writer down instead of filling memory.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { AtomicFile, type AtomicOptions } from '../../util/atomic.js';
import { writeFully } from '../disk/io.js';
import { QemuError } from '../../util/errors.js';

export interface StreamSink {
  /** For messages: the file path or the socket's name. */
  readonly name: string;
  /** Writes `data` at `position` (always the end of what was written before). */
  write(data: Buffer, position: number): Promise<void>;
  /** Everything is written: make it final (rename the file / end the socket). */
  commit(): Promise<void>;
  /** Drop it: remove the file / destroy the socket. Safe to call twice. */
  abort(): Promise<void>;
}

export async function fileSink(path: string, options: AtomicOptions = {}): Promise<StreamSink> {
  const file = await AtomicFile.create(path, options);
  return {
    name: path,
    write: (data, position) => writeFully(file.handle, data, position),
    commit: () => file.commit(),
    abort: () => file.abort(),
  };
}

/**
 * A sink into a FIFO that a `cat` started by QEMU (`-incoming exec:cat FIFO`) reads. Writes run
 * on libuv's thread pool and block there until QEMU has taken the bytes, one after the other —
 * so feeding QEMU never needs this (busy) thread's event loop, unlike a socket, which is only
 * written while the thread is idle. Opening waits for the reader (QEMU's cat).
 */
export function fifoSink(path: string): StreamSink {
  let chain: Promise<void> = Promise.resolve();
  let fh: FileHandle | undefined;
  let opening: Promise<FileHandle> | undefined;
  let failed: Error | undefined;
  const handle = (): Promise<FileHandle> => (opening ??= open(path, 'w').then((h) => (fh = h)));
  const enqueue = (fn: (h: FileHandle) => Promise<void>): Promise<void> => {
    const next = chain.then(async () => {
      if (failed) throw failed;
      try {
        await fn(await handle());
      } catch (err) {
        failed ??= new QemuError(`QEMU stopped reading the memory stream (${path}): ${(err as Error).message}`);
        throw failed;
      }
    });
    chain = next.catch(() => undefined);
    return next;
  };
  return {
    name: path,
    write: (data) => enqueue((h) => writeFully(h, data, null)),
    commit: () => enqueue((h) => h.close()),
    async abort() {
      failed ??= new QemuError('memory stream aborted');
      // Whoever waits on the FIFO's other end is let go: our own open() (no reader came) and a
      // reader (QEMU's cat) that no writer came for. A writer blocked on a full FIFO is released
      // by the reader going away (QEMU is killed by the caller).
      for (const flags of [constants.O_RDONLY | constants.O_NONBLOCK, constants.O_WRONLY | constants.O_NONBLOCK]) {
        await open(path, flags).then(
          (h) => h.close(),
          () => undefined,
        );
      }
      await fh?.close().catch(() => undefined);
    },
  };
}
