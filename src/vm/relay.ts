/**
 * Copies a FIFO into a unix socket on a thread of its own: a QEMU run by libvirt may not spawn
 * `cat` (libvirt's seccomp sandbox), so it listens on a socket instead, and this relay feeds it
 * what the synthesizer writes into the FIFO. On its own event loop, the copy goes on however busy
 * the main thread is (a socket written from the main thread is only serviced while it idles).
 */
import { Worker } from 'node:worker_threads';

const RELAY = `
const { workerData, parentPort } = require('node:worker_threads');
const { createReadStream } = require('node:fs');
const { connect } = require('node:net');
const { pipeline } = require('node:stream/promises');
const connectTo = (path, tries) => new Promise((resolve, reject) => {
  const s = connect(path);
  s.once('connect', () => resolve(s));
  s.once('error', (err) => (tries > 0 ? setTimeout(() => connectTo(path, tries - 1).then(resolve, reject), 10) : reject(err)));
});
(async () => {
  const socket = await connectTo(workerData.socket, 200);
  await pipeline(createReadStream(workerData.fifo, { highWaterMark: 1 << 20 }), socket);
})().then(() => parentPort.postMessage({ ok: true }), (err) => parentPort.postMessage({ ok: false, message: String(err && err.message) }));
`;

/** Starts the relay; the promise settles when the FIFO's writer closed and all went to the socket. */
export function relayFifoToSocket(fifo: string, socket: string): Promise<void> {
  const w = new Worker(RELAY, { eval: true, workerData: { fifo, socket } });
  return new Promise<void>((resolve, reject) => {
    w.once('message', (m: { ok: boolean; message?: string }) => {
      void w.terminate();
      if (m.ok) resolve();
      else reject(new Error(`memory relay: ${m.message ?? 'failed'}`));
    });
    w.once('error', reject);
  });
}
