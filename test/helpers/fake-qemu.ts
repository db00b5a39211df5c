/**
 * A stand-in `qemu-system-x86_64` for CLI tests that need QEMU to behave in one exact way
 * without running a VM: installFakeQemu(dir, mode) writes an executable of that name into `dir`
 * (put it first on PATH). Modes:
 * - `die`: prints a QEMU-like error and exits 1 (a QEMU failure, exit code 8);
 * - `serve`: serves QMP on the socket of its -chardev id=qmp (greeting, qmp_capabilities,
 *   migrate-incoming from a unix socket or exec:cat of a file or FIFO, which it drains, query-status, query-migrate
 *   "completed", cont, quit, anything else answered {}), so a resume "succeeds" and whatever
 *   waits for the guest times out.
 */
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

const SCRIPT = String.raw`
const net = require('node:net');
const mode = process.env.FAKE_QEMU_MODE || 'serve';
const args = process.argv.slice(2);
if (mode === 'die') {
  process.stderr.write('qemu-system-x86_64: -device virtio-net-pci: fake failure for a test\n');
  process.exit(1);
}
const servers = [];
let status = 'paused';
for (let i = 0; i < args.length; i++) {
  if (args[i] !== '-chardev') continue;
  const opts = args[i + 1];
  const path = /path=([^,]+)/.exec(opts)?.[1];
  const id = /id=([^,]+)/.exec(opts)?.[1];
  if (!path) continue;
  const server = net.createServer((sock) => {
    if (id !== 'qmp') return;
    sock.write(JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } }) + '\n');
    let buf = '';
    sock.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const cmd = JSON.parse(line);
        let ret = {};
        if (cmd.execute === 'query-status') ret = { status, running: status === 'running' };
        if (cmd.execute === 'query-migrate') ret = { status: 'completed' };
        if (cmd.execute === 'cont') status = 'running';
        const uri = cmd.arguments?.uri ?? '';
        if (cmd.execute === 'migrate-incoming' && uri.startsWith('unix:')) {
          // The streamed resume: take the memory stream on the socket, "loading" until it ends.
          status = 'inmigrate';
          const mig = net.createServer((c) => {
            c.on('data', () => undefined);
            c.on('end', () => (status = 'paused'));
            c.on('error', () => undefined);
          });
          mig.listen(uri.slice(5));
          servers.push(mig);
        }
        const cat = /^exec:cat '(.*)'$/.exec(uri);
        if (cmd.execute === 'migrate-incoming' && cat) {
          // A file or FIFO read to its end, as QEMU's exec:cat would.
          status = 'inmigrate';
          const rs = require('node:fs').createReadStream(cat[1].replaceAll("'\\''", "'"));
          rs.on('data', () => undefined);
          rs.on('end', () => (status = 'paused'));
          rs.on('error', () => undefined);
        }
        sock.write(JSON.stringify({ return: ret, id: cmd.id }) + '\n');
        if (cmd.execute === 'quit') setTimeout(() => process.exit(0), 10);
      }
    });
  });
  server.listen(path);
  servers.push(server);
}
process.on('SIGTERM', () => process.exit(0));
setInterval(() => undefined, 1 << 30);
`;

export async function installFakeQemu(dir: string): Promise<string> {
  const path = join(dir, 'qemu-system-x86_64');
  await writeFile(path, `#!${process.execPath}\n${SCRIPT}`);
  await chmod(path, 0o755);
  return path;
}
