/**
 * Where a migration stream goes: a file that appears atomically once committed, or a connected
 * socket (QEMU's `migrate-incoming unix:…` channel) that QEMU loads while we write. Writes are
 * sequential; a socket write resolves when the kernel took the bytes, so a slow QEMU slows the
 * writer down instead of filling memory.
 */
import type { Socket } from 'node:net';
import { AtomicFile } from '../../util/atomic.js';
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

export async function fileSink(path: string): Promise<StreamSink> {
  const file = await AtomicFile.create(path);
  return {
    name: path,
    write: (data, position) => writeFully(file.handle, data, position),
    commit: () => file.commit(),
    abort: () => file.abort(),
  };
}

/** A sink over a connected socket; a peer that goes away fails the next write. */
export function socketSink(socket: Socket, name: string): StreamSink {
  let broken: Error | undefined;
  socket.on('error', (err) => {
    broken ??= err;
  });
  socket.on('close', () => {
    broken ??= new Error('connection closed');
  });
  const fail = (): never => {
    throw new QemuError(`QEMU stopped reading the memory stream (${name}): ${broken?.message ?? 'closed'}`);
  };
  return {
    name,
    write(data) {
      if (broken) fail();
      return new Promise<void>((resolve, reject) => {
        socket.write(data, (err) => (err ? reject(new QemuError(`writing the memory stream to QEMU failed: ${err.message}`)) : resolve()));
      });
    },
    commit() {
      if (broken) fail();
      return new Promise<void>((resolve) => socket.end(resolve));
    },
    abort() {
      socket.destroy();
      return Promise.resolve();
    },
  };
}
