/**
 * Pure tests of the QEMU layer: the argv builder (what a resume must match is in it), spec
 * validation and rewriting, the KVM probe firmware, and the QMP client against a fake server
 * (partial lines, several messages per chunk, errors, events). No QEMU needed.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { resumeSpec, validateSpec, type VmSpec } from '../../src/spec/vm-spec.js';
import { buildQemuArgs, incomingUri, qemuOptValue, runPaths, shellQuote } from '../../src/vm/argv.js';
import { kvmProbeFirmware } from '../../src/vm/accel.js';
import { specFromArgv } from '../../src/vm/argv-spec.js';
import { QmpClient, type QmpEvent } from '../../src/vm/qmp.js';
import { QemuError, TimeoutError, UsageError } from '../../src/util/errors.js';

const paths = runPaths('/run/vm1');

function demoSpec(): VmSpec {
  return {
    machine: 'pc-q35-7.2',
    memoryMiB: 128,
    kernel: '/k/vmlinuz',
    initrd: '/k/initrd.img',
    append: 'console=ttyS0 panic=-1 quiet',
    drives: [{ file: '/d/disk.raw', format: 'raw', if: 'virtio' }],
    network: { romfile: '', forwards: [{ hostPort: 18080, guestPort: 8080 }] },
  };
}

/** The value following `flag` each time it occurs. */
function values(args: string[], flag: string): string[] {
  const out: string[] = [];
  args.forEach((a, i) => {
    if (a === flag && i + 1 < args.length) out.push(args[i + 1] ?? '');
  });
  return out;
}

describe('buildQemuArgs', () => {
  it('pins machine, memory, CPU and accel', () => {
    const args = buildQemuArgs(demoSpec(), { accel: 'tcg', paths });
    assert.deepEqual(values(args, '-machine'), ['pc-q35-7.2']);
    assert.deepEqual(values(args, '-accel'), ['tcg']);
    assert.deepEqual(values(args, '-m'), ['128']);
    assert.deepEqual(values(args, '-cpu'), ['qemu64']);
    assert.deepEqual(values(args, '-smp'), ['1']);
    for (const f of ['-nodefaults', '-no-user-config', '-no-reboot']) assert.ok(args.includes(f), f);
    assert.deepEqual(values(args, '-display'), ['none']);
  });

  it('direct kernel boot keeps the command line as one argument', () => {
    const args = buildQemuArgs(demoSpec(), { accel: 'tcg', paths });
    assert.deepEqual(values(args, '-kernel'), ['/k/vmlinuz']);
    assert.deepEqual(values(args, '-initrd'), ['/k/initrd.img']);
    assert.deepEqual(values(args, '-append'), ['console=ttyS0 panic=-1 quiet']);
  });

  it('QMP and a logged serial socket live in the run directory', () => {
    const args = buildQemuArgs(demoSpec(), { accel: 'tcg', paths });
    const chardevs = values(args, '-chardev');
    assert.ok(chardevs.includes('socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off'));
    assert.ok(
      chardevs.includes(
        'socket,id=serial0,path=/run/vm1/serial.sock,server=on,wait=off,logfile=/run/vm1/serial.log,logappend=on',
      ),
    );
    assert.deepEqual(values(args, '-mon'), ['chardev=qmp,mode=control']);
    assert.deepEqual(values(args, '-serial'), ['chardev:serial0']);
  });

  it('drives, user networking with forwards, and a NIC without option ROM', () => {
    const spec = demoSpec();
    spec.network = {
      romfile: '',
      mac: '52:54:00:12:34:56',
      forwards: [
        { hostPort: 18080, guestPort: 8080 },
        { hostAddr: '0.0.0.0', hostPort: 2222, guestPort: 22 },
      ],
    };
    const args = buildQemuArgs(spec, { accel: 'kvm', paths });
    assert.deepEqual(values(args, '-drive'), ['file=/d/disk.raw,format=raw,if=virtio,id=drive0']);
    assert.deepEqual(values(args, '-netdev'), [
      'user,id=n0,hostfwd=tcp:127.0.0.1:18080-:8080,hostfwd=tcp:0.0.0.0:2222-:22',
    ]);
    assert.deepEqual(values(args, '-device'), ['virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56']);
  });

  it('escapes commas in paths (QEMU option syntax)', () => {
    const spec = demoSpec();
    spec.drives = [{ file: '/d/a,b.raw', format: 'qcow2', if: 'virtio', readOnly: true, cache: 'unsafe' }];
    const args = buildQemuArgs(spec, { accel: 'tcg', paths: runPaths('/r,x') });
    assert.deepEqual(values(args, '-drive'), [
      'file=/d/a,,b.raw,format=qcow2,if=virtio,id=drive0,readonly=on,cache=unsafe',
    ]);
    assert.ok(values(args, '-chardev').some((c) => c.includes('path=/r,,x/qmp.sock')));
    assert.equal(qemuOptValue('a,,b'), 'a,,,,b');
  });

  it('RAM from a file: memory-backend-file plus machine memory-backend', () => {
    const spec = demoSpec();
    spec.memoryBackendFile = { path: '/lib/base/pc.ram', share: false };
    const args = buildQemuArgs(spec, { accel: 'tcg', paths });
    assert.deepEqual(values(args, '-machine'), ['pc-q35-7.2,memory-backend=pc.ram']);
    assert.deepEqual(values(args, '-object'), [
      'memory-backend-file,id=pc.ram,size=128M,mem-path=/lib/base/pc.ram,share=off',
    ]);
  });

  it('incoming snapshots start deferred; host args go last', () => {
    const spec = { ...demoSpec(), incoming: { from: 'file' as const, path: '/s/base.mem' } };
    const args = buildQemuArgs(spec, { accel: 'tcg', paths, hostArgs: ['-x'] });
    assert.deepEqual(values(args, '-incoming'), ['defer']);
    assert.ok(args.includes('-S'), 'a resumed VM stays paused until told to run');
    assert.equal(args.at(-1), '-x');
    assert.equal(incomingUri({ from: 'file', path: "/s/it's.mem" }), `exec:cat '/s/it'\\''s.mem'`);
    assert.equal(incomingUri({ from: 'unix', path: '/run/i/mig.sock' }), 'unix:/run/i/mig.sock');
  });

  it('is pure: the same spec gives the same argv', () => {
    assert.deepEqual(
      buildQemuArgs(demoSpec(), { accel: 'tcg', paths }),
      buildQemuArgs(demoSpec(), { accel: 'tcg', paths }),
    );
  });

  it('no network section means no NIC at all', () => {
    const spec = demoSpec();
    delete spec.network;
    const args = buildQemuArgs(spec, { accel: 'tcg', paths });
    assert.equal(values(args, '-netdev').length, 0);
    assert.equal(values(args, '-device').length, 0);
  });
});

describe('discard and the guest agent channel (issue 10)', () => {
  it('discard and detect-zeroes are drive options; the guest agent is a virtio-serial port after the NIC', () => {
    const spec = demoSpec();
    spec.drives![0] = { ...spec.drives![0]!, discard: 'unmap', detectZeroes: 'unmap' };
    spec.guestAgent = true;
    const args = buildQemuArgs(spec, { accel: 'tcg', paths });
    assert.deepEqual(values(args, '-drive'), [
      'file=/d/disk.raw,format=raw,if=virtio,id=drive0,discard=unmap,detect-zeroes=unmap',
    ]);
    assert.ok(values(args, '-chardev').includes('socket,id=cl-agent,path=/run/vm1/agent.sock,server=on,wait=off'));
    const devices = values(args, '-device');
    assert.deepEqual(devices.slice(-2), [
      'virtio-serial-pci,id=cl-vser0',
      'virtserialport,bus=cl-vser0.0,chardev=cl-agent,name=org.qemu.guest_agent.0',
    ]);
    assert.ok(devices[0]!.startsWith('virtio-net-pci'), 'the NIC keeps its PCI slot');
    // Without them, the argv is what it always was.
    const plain = buildQemuArgs(demoSpec(), { accel: 'tcg', paths });
    assert.ok(!plain.join(' ').includes('discard') && !plain.join(' ').includes('agent'));
  });

  it('detect-zeroes=unmap needs discard=unmap', () => {
    const spec = demoSpec();
    spec.drives![0] = { ...spec.drives![0]!, detectZeroes: 'unmap' };
    assert.throws(() => validateSpec(spec), UsageError);
  });

  it('reads both back from a command line (snapshot --qmp of such a VM)', () => {
    const spec = demoSpec();
    spec.drives![0] = { ...spec.drives![0]!, discard: 'unmap', detectZeroes: 'unmap' };
    spec.guestAgent = true;
    const back = specFromArgv(['qemu-system-x86_64', ...buildQemuArgs(spec, { accel: 'tcg', paths })]);
    assert.equal(back.guestAgent, true);
    assert.equal(back.drives?.[0]?.discard, 'unmap');
    assert.equal(back.drives?.[0]?.detectZeroes, 'unmap');
    assert.equal(back.extraArgs, undefined, 'no opaque devices left over');
  });
});

describe('validateSpec', () => {
  it('refuses unpinned machine types', () => {
    for (const machine of ['q35', 'pc', 'pc-q35']) {
      assert.throws(() => validateSpec({ ...demoSpec(), machine }), UsageError, machine);
    }
    validateSpec({ ...demoSpec(), machine: 'pc-i440fx-7.2' });
  });

  it('refuses nonsense sizes, ports and an initrd without kernel', () => {
    assert.throws(() => validateSpec({ ...demoSpec(), memoryMiB: 0 }), UsageError);
    assert.throws(() => validateSpec({ ...demoSpec(), memoryMiB: 1.5 }), UsageError);
    assert.throws(() => validateSpec({ ...demoSpec(), smp: 0 }), UsageError);
    const noKernel = demoSpec();
    delete noKernel.kernel;
    assert.throws(() => validateSpec(noKernel), UsageError);
    const badPort = demoSpec();
    badPort.network = { forwards: [{ hostPort: 70000, guestPort: 80 }] };
    assert.throws(() => validateSpec(badPort), UsageError);
  });
});

describe('resumeSpec', () => {
  it('keeps guest-visible parts and swaps files, ports and the incoming stream', () => {
    const src = demoSpec();
    const r = resumeSpec(src, {
      incoming: { from: 'file', path: '/s/base.mem' },
      driveFiles: ['/w/copy.raw'],
      forwards: [{ hostPort: 19090, guestPort: 8080 }],
    });
    assert.deepEqual(r.incoming, { from: 'file', path: '/s/base.mem' });
    assert.deepEqual(r.drives, [{ file: '/w/copy.raw', format: 'raw', if: 'virtio' }]);
    assert.deepEqual(r.network, { romfile: '', forwards: [{ hostPort: 19090, guestPort: 8080 }] });
    assert.equal(r.machine, src.machine);
    assert.equal(r.kernel, src.kernel);
    assert.equal(src.incoming, undefined, 'the source spec is not modified');
    assert.equal(src.drives?.[0]?.file, '/d/disk.raw');
  });

  it('refuses a different number of drives', () => {
    assert.throws(
      () => resumeSpec(demoSpec(), { incoming: { from: 'file', path: '/m' }, driveFiles: ['/a', '/b'] }),
      UsageError,
    );
  });
});

describe('shellQuote', () => {
  it('quotes for /bin/sh', () => {
    assert.equal(shellQuote('/a b/c'), "'/a b/c'");
    assert.equal(shellQuote("x'y"), `'x'\\''y'`);
  });
});

describe('KVM probe firmware', () => {
  it('is a 64 KiB image with a far jump at the reset vector', () => {
    const fw = kvmProbeFirmware();
    assert.equal(fw.length, 0x10000);
    assert.equal(fw[0xfff0], 0xea, 'ljmp');
    assert.deepEqual([...fw.subarray(0xfff1, 0xfff5)], [0x00, 0x00, 0x00, 0xf0], 'to f000:0000');
    assert.equal(fw[0], 0xfa, 'starts with cli');
    // The success path writes 0x2a to port 0xf4 (mov al,0x2a; out 0xf4,al).
    assert.ok(fw.includes(Buffer.from([0xb0, 0x2a, 0xe6, 0xf4])));
  });
});

// ---- QMP against a fake server -------------------------------------------------------------

interface FakeQmp {
  path: string;
  server: Server;
  sockets: Socket[];
  close(): Promise<void>;
}

/** A fake QMP server; `reply` answers each parsed command by writing raw text. */
async function fakeQmp(
  reply: (cmd: { execute: string; id?: string; arguments?: unknown }, s: Socket) => void,
): Promise<FakeQmp> {
  const dir = await mkdtemp(join(tmpdir(), 'qmp-test-'));
  const path = join(dir, 'qmp.sock');
  const sockets: Socket[] = [];
  const server = createServer((s) => {
    sockets.push(s);
    s.write(
      '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "x"}, ' +
        '"capabilities": ["oob"]}}\r\n',
    );
    let buf = '';
    s.setEncoding('utf8');
    s.on('data', (d: string) => {
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) reply(JSON.parse(line) as { execute: string; id?: string }, s);
      }
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return {
    path,
    server,
    sockets,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

describe('QmpClient (fake server)', () => {
  it('negotiates, runs commands and handles split and batched messages', async () => {
    const fake = await fakeQmp((cmd, s) => {
      const id = JSON.stringify(cmd.id);
      if (cmd.execute === 'qmp_capabilities') s.write(`{"return": {}, "id": ${id}}\r\n`);
      else if (cmd.execute === 'query-status') {
        // one reply split over three writes, with an event batched in front
        const msg =
          '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n' +
          `{"return": {"status": "paused", "running": false}, "id": ${id}}\r\n`;
        s.write(msg.slice(0, 10));
        setTimeout(() => s.write(msg.slice(10, 80)), 5);
        setTimeout(() => s.write(msg.slice(80)), 10);
      } else if (cmd.execute === 'bad') {
        s.write(
          `{"error": {"class": "CommandNotFound", "desc": "The command bad has not been found"}, "id": ${id}}\r\n`,
        );
      }
    });
    try {
      const qmp = await QmpClient.connect(fake.path, { timeoutMs: 2000 });
      assert.equal(qmp.greeting.QMP.version.qemu.major, 7);
      const events: QmpEvent[] = [];
      qmp.on('event', (e) => events.push(e));
      const stop = qmp.waitForEvent('STOP', { timeoutMs: 1000 });
      const status = await qmp.execute<{ status: string }>('query-status');
      assert.equal(status.status, 'paused');
      assert.equal((await stop).event, 'STOP');
      assert.equal(events.length, 1);
      await assert.rejects(qmp.execute('bad'), (err: unknown) => {
        assert.ok(err instanceof QemuError);
        assert.equal(err.details['qmpClass'], 'CommandNotFound');
        assert.match(err.message, /has not been found/);
        return true;
      });
      await assert.rejects(qmp.execute('silent', undefined, { timeoutMs: 50 }), TimeoutError);
      await qmp.close();
      assert.equal(qmp.closed, true);
      await assert.rejects(qmp.execute('query-status'), QemuError);
    } finally {
      await fake.close();
    }
  });

  it('fails pending commands when the connection drops', async () => {
    const fake = await fakeQmp((cmd, s) => {
      if (cmd.execute === 'qmp_capabilities') s.write(`{"return": {}, "id": ${JSON.stringify(cmd.id)}}\n`);
      else s.destroy();
    });
    try {
      const qmp = await QmpClient.connect(fake.path, { timeoutMs: 2000 });
      await assert.rejects(qmp.execute('quit'), /closed/);
    } finally {
      await fake.close();
    }
  });

  it('retries until the socket appears, and gives up at the deadline', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qmp-test-'));
    try {
      const t0 = Date.now();
      await assert.rejects(QmpClient.connect(join(dir, 'none.sock'), { timeoutMs: 200 }), TimeoutError);
      assert.ok(Date.now() - t0 >= 150);
      const ac = new AbortController();
      setTimeout(() => ac.abort(new QemuError('QEMU exited')), 50);
      await assert.rejects(
        QmpClient.connect(join(dir, 'none.sock'), { timeoutMs: 5000, signal: ac.signal }),
        /QEMU exited/,
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
