/**
 * Where a migration stream goes: a file that appears atomically once committed, or a connected
 * socket (QEMU's `migrate-incoming unix:…` channel) that QEMU loads while we write. Writes are
 * sequential; a socket write resolves when the kernel took the bytes, so a slow QEMU slows the
 * writer down instead of filling memory.
 */
import type { Socket } from 'node:net';
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
 * A sink over a socket, possibly still connecting (QEMU starts while the stream is already
 * being built): writes wait for the connection; if it fails, so do they, with its error.
 * A peer that goes away fails the next write.
 */
export function socketSink(connecting: Promise<Socket>, name: string): StreamSink {
  let broken: Error | undefined;
  let socket: Socket | undefined;
  const ready = connecting.then((s) => {
    socket = s;
    s.on('error', (err) => {
      broken ??= err;
    });
    s.on('close', () => {
      broken ??= new Error('connection closed');
    });
    return s;
  });
  ready.catch(() => undefined); // surfaces through the first write
  const check = (): void => {
    if (broken) throw new QemuError(`QEMU stopped reading the memory stream (${name}): ${broken.message}`);
  };
  return {
    name,
    async write(data) {
      const s = await ready;
      check();
      await new Promise<void>((resolve, reject) => {
        s.write(data, (err) =>
          err ? reject(new QemuError(`writing the memory stream to QEMU failed: ${err.message}`)) : resolve(),
        );
      });
    },
    async commit() {
      const s = await ready;
      check();
      await new Promise<void>((resolve) => s.end(resolve));
    },
    abort() {
      socket?.destroy();
      void ready.then(
        (s) => s.destroy(),
        () => undefined,
      );
      return Promise.resolve();
    },
  };
}
