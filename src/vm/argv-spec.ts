/**
 * Reads a VmSpec back from a QEMU command line (/proc/<pid>/cmdline of a VM we did not start),
 * so a snapshot of it can be resumed with the same guest-visible machine. Host-side plumbing
 * (QMP, serial sockets, -incoming, daemonize, pidfile) is dropped; guest-visible options we do
 * not model are kept verbatim in extraArgs.
 */
import type { DriveSpec, NetworkSpec, PortForward, VmSpec } from '../spec/vm-spec.js';
import { UnsupportedError } from '../util/errors.js';
import { AGENT_PORT_NAME } from './argv.js';

/** Options that only concern the host side of this one process. */
const HOST_ONLY = new Set([
  '-qmp',
  '-monitor',
  '-mon',
  '-serial',
  '-incoming',
  '-pidfile',
  '-name',
  '-display',
  '-vnc',
  '-accel',
  '-enable-kvm',
]);
const FLAGS = new Set([
  '-nodefaults',
  '-no-user-config',
  '-no-reboot',
  '-daemonize',
  '-enable-kvm',
  '-S',
  '-nographic',
  '-no-shutdown',
]);

function opts(value: string): Map<string, string> {
  const m = new Map<string, string>();
  // QEMU escapes a comma inside a value as ",,".
  const parts = value.replaceAll(',,', '\u0000').split(',');
  parts.forEach((p, i) => {
    const eq = p.indexOf('=');
    const [k, v] = eq < 0 ? (i === 0 ? ['', p] : [p, 'on']) : [p.slice(0, eq), p.slice(eq + 1)];
    m.set(k, v.replaceAll('\u0000', ','));
  });
  return m;
}

export function specFromArgv(argv: readonly string[]): VmSpec {
  const spec: Partial<VmSpec> & { drives: DriveSpec[]; extraArgs: string[] } = { drives: [], extraArgs: [] };
  const netdevs = new Map<string, PortForward[]>();
  let network: NetworkSpec | undefined;
  const chardevs = new Set<string>();
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    const flag = a.startsWith('--') ? a.slice(1) : a;
    if (FLAGS.has(flag)) {
      if (flag === '-no-reboot') spec.noReboot = true;
      continue;
    }
    const v = argv[i + 1] ?? '';
    i++;
    switch (flag) {
      case '-machine':
      case '-M': {
        const o = opts(v);
        spec.machine = o.get('') ?? o.get('type') ?? '';
        break;
      }
      case '-m':
        spec.memoryMiB = parseMemory(opts(v).get('') ?? opts(v).get('size') ?? v);
        break;
      case '-cpu':
        spec.cpu = v.split(',')[0];
        if (v.includes(',')) spec.extraArgs.push('-cpu', v);
        break;
      case '-smp':
        spec.smp = Number(opts(v).get('') ?? opts(v).get('cpus') ?? 1);
        break;
      case '-kernel':
        spec.kernel = v;
        break;
      case '-initrd':
        spec.initrd = v;
        break;
      case '-append':
        spec.append = v;
        break;
      case '-drive': {
        const o = opts(v);
        const format = o.get('format');
        if (format !== 'raw' && format !== 'qcow2')
          throw new UnsupportedError(
            `drive format ${format ?? '(probed)'} is not supported for snapshots: give format=raw or qcow2`,
          );
        const iface = (o.get('if') ?? 'ide') as DriveSpec['if'];
        const drive: DriveSpec = {
          file: o.get('file') ?? '',
          format,
          if: iface,
          ...(o.get('id') ? { id: o.get('id') } : {}),
        };
        const discard = o.get('discard');
        if (discard === 'unmap' || discard === 'on') drive.discard = 'unmap';
        const dz = o.get('detect-zeroes');
        if (dz === 'unmap' || dz === 'on' || dz === 'off') drive.detectZeroes = dz;
        spec.drives.push(drive);
        break;
      }
      case '-netdev': {
        const o = opts(v);
        if (o.get('') !== 'user')
          throw new UnsupportedError(`netdev ${o.get('')} is not supported: only user-mode networking`);
        const fwd: PortForward[] = [];
        for (const [k, val] of o) {
          if (k !== 'hostfwd') continue;
          const m = val.match(/^tcp:([^:]*):(\d+)-[^:]*:(\d+)$/);
          if (m) fwd.push({ hostAddr: m[1] || '127.0.0.1', hostPort: Number(m[2]), guestPort: Number(m[3]) });
        }
        netdevs.set(o.get('id') ?? '', fwd);
        break;
      }
      case '-device': {
        const o = opts(v);
        const model = o.get('') ?? '';
        const netdev = o.get('netdev');
        // Our own guest agent channel (argv.ts): the spec's guestAgent, not opaque devices.
        if ((model === 'virtio-serial-pci' && o.get('id') === 'cl-vser0') || o.get('chardev') === 'cl-agent') {
          if (model === 'virtserialport' && o.get('name') === AGENT_PORT_NAME) spec.guestAgent = true;
          break;
        }
        if (netdev !== undefined && !network) {
          network = { model, romfile: o.get('romfile') ?? undefined, forwards: netdevs.get(netdev) ?? [] };
          if (o.get('mac')) network.mac = o.get('mac');
        } else {
          spec.extraArgs.push('-device', v);
        }
        break;
      }
      case '-chardev':
        chardevs.add(opts(v).get('id') ?? '');
        break;
      case '-object':
        if (opts(v).get('id') === 'pc.ram') break; // the RAM backend is ours to choose on resume
        spec.extraArgs.push('-object', v);
        break;
      default:
        if (HOST_ONLY.has(flag)) break;
        spec.extraArgs.push(a, v);
    }
  }
  if (!spec.machine || !spec.memoryMiB)
    throw new UnsupportedError('cannot read machine type and memory size from the QEMU command line');
  const out: VmSpec = { machine: spec.machine, memoryMiB: spec.memoryMiB };
  if (spec.cpu) out.cpu = spec.cpu;
  if (spec.smp) out.smp = spec.smp;
  if (spec.kernel) out.kernel = spec.kernel;
  if (spec.initrd) out.initrd = spec.initrd;
  if (spec.append !== undefined) out.append = spec.append;
  if (spec.drives.length) out.drives = spec.drives;
  if (network) out.network = network;
  if (spec.noReboot) out.noReboot = true;
  if (spec.guestAgent) out.guestAgent = true;
  if (spec.extraArgs.length) out.extraArgs = spec.extraArgs;
  return out;
}

function parseMemory(v: string): number {
  const m = v.match(/^(\d+)([MGmg]?)$/);
  if (!m) throw new UnsupportedError(`cannot read memory size ${v}`);
  return Number(m[1]) * (m[2]?.toLowerCase() === 'g' ? 1024 : 1);
}
