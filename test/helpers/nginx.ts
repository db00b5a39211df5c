/**
 * A throttled web server for benchmarks and tests: Debian's nginx started on 127.0.0.1 with its
 * own configuration in a temporary directory, serving one directory with `limit_rate` per
 * connection (a link of a given speed), Range requests included. Stopped by stop().
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { freePort } from './demo-vm.js';

const exec = promisify(execFile);

export interface Nginx {
  url: string;
  port: number;
  stop(): Promise<void>;
}

export async function nginxAvailable(): Promise<boolean> {
  return exec('nginx', ['-v']).then(
    () => true,
    () => false,
  );
}

/** Serves `root`; `bitsPerSecond` per connection (undefined: unthrottled). */
export async function startNginx(root: string, dir: string, bitsPerSecond?: number): Promise<Nginx> {
  await mkdir(join(dir, 'tmp'), { recursive: true });
  const port = await freePort();
  const rate = bitsPerSecond ? `limit_rate ${Math.round(bitsPerSecond / 8)};` : '';
  const conf = join(dir, 'nginx.conf');
  await writeFile(
    conf,
    `daemon off;
${process.getuid?.() === 0 ? 'user root;' : ''}
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log ${join(dir, 'error.log')} warn;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path ${join(dir, 'tmp')};
  proxy_temp_path ${join(dir, 'tmp')};
  fastcgi_temp_path ${join(dir, 'tmp')};
  uwsgi_temp_path ${join(dir, 'tmp')};
  scgi_temp_path ${join(dir, 'tmp')};
  sendfile on;
  server {
    listen 127.0.0.1:${port};
    root ${root};
    location / { ${rate} }
  }
}
`,
  );
  const child: ChildProcess = spawn('nginx', ['-c', conf, '-p', dir], { stdio: 'ignore' });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    const up = await fetch(`${url}/`, { method: 'HEAD' }).then(
      () => true,
      () => false,
    );
    if (up) break;
    if (i > 200 || child.exitCode !== null) throw new Error(`nginx did not start (see ${join(dir, 'error.log')})`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    url,
    port,
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
      }
    },
  };
}
