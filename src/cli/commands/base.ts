import { Command, Option } from 'commander';
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { importBase } from '../../base/import.js';
import { exportBase, importPackage, listBases, removeBase, resolveBaseId, showBase, verifyBase } from '../../base/library.js';
import { libraryRoot, tmpDir } from '../../base/paths.js';
import type { VmSpec } from '../../vm/qemu.js';
import { SNAPSHOT_MEMORY, SNAPSHOT_VM, snapshotVm, type SnapshotVmFile } from '../../api/snapshot.js';
import { CorruptInputError, NotFoundError, UsageError } from '../../util/errors.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';
import { printGlanceBases, registerBaseGlance } from './base-glance.js';

export async function readSnapshotDir(dir: string): Promise<{ disk?: string; diskFormat?: string; memory: string; vm: VmSpec; qemuVersion?: string }> {
  let parsed: SnapshotVmFile;
  try {
    parsed = JSON.parse(await readFile(join(dir, SNAPSHOT_VM), 'utf8')) as SnapshotVmFile;
  } catch {
    throw new NotFoundError(`${dir} is not a snapshot directory (no readable ${SNAPSHOT_VM})`, { path: dir });
  }
  if (!parsed.vm || typeof parsed.vm.machine !== 'string') throw new CorruptInputError(`${join(dir, SNAPSHOT_VM)}: no VM spec`);
  return {
    disk: parsed.disk ? join(dir, parsed.disk.file) : undefined,
    diskFormat: parsed.disk?.format,
    memory: join(dir, SNAPSHOT_MEMORY),
    vm: parsed.vm,
    qemuVersion: parsed.qemu_version,
  };
}

interface ImportFlags {
  disk?: string;
  diskFormat?: string;
  memory?: string;
  vm?: string;
  name?: string;
}

export function registerBase(program: Command): void {
  const base = program
    .command('base')
    .summary('manage the library of base VMs (import, list, show, rm, export, verify, push/pull to Glance)')
    .description(
      'The base library holds base VMs by id (sha256 over their contents): disk, memory snapshot, ' +
        'the base RAM file a synthesized VM maps copy-on-write, chunk hash indexes, and the VM spec ' +
        'a resume must match. Location: --library, $CLOUDLET_LIBRARY, or $XDG_DATA_HOME/cloudlet-overlay.',
    );

  base
    .command('import')
    .summary('add a base VM: from a snapshot directory, a package, or files')
    .argument('[source]', 'a snapshot directory (from `snapshot`) or a package (from `base export`)')
    .option('--disk <image>', 'base disk image')
    .option('--disk-format <fmt>', 'format of --disk (default: detected)')
    .option('--memory <file>', 'base memory snapshot (QEMU migration stream or libvirt save image)')
    .option('--vm <file>', 'VM spec JSON (vm.json of a snapshot directory) needed to resume the base')
    .option('--name <name>', 'a name to refer to the base by')
    .addHelpText(
      'after',
      `
Examples:
  cloudlet-overlay base import ./base-snapshot            # written by: cloudlet-overlay snapshot
  cloudlet-overlay base import ubuntu-base.tar             # written by: cloudlet-overlay base export
  cloudlet-overlay base import --disk base.qcow2 --memory base.mem --vm vm.json --name web`,
    )
    .action(async (source: string | undefined, flags: ImportFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const progress = makeProgress(g);
      if (source) {
        if (flags.disk || flags.memory || flags.vm) throw new UsageError('give a source or --disk/--memory/--vm, not both');
        const st = await stat(source).catch(() => {
          throw new NotFoundError(`${source} does not exist`, { path: source });
        });
        if (st.isFile()) {
          const r = await importPackage(root, source, progress);
          printResult(g, { message_type: 'base_import', ...r }, () => `${r.added ? 'imported' : 'already present'}: base ${r.id}`);
          return;
        }
        const snap = await readSnapshotDir(source);
        const r = await importBase({ root, disk: snap.disk, diskFormat: snap.diskFormat, memory: snap.memory, vm: snap.vm, name: flags.name, qemuVersion: snap.qemuVersion, progress });
        printResult(g, r, () => `${r.added ? 'imported' : 'already present'}: base ${r.id}`);
        return;
      }
      let vm: VmSpec | undefined;
      if (flags.vm) {
        const parsed = JSON.parse(await readFile(flags.vm, 'utf8')) as SnapshotVmFile | VmSpec;
        vm = 'vm' in parsed ? parsed.vm : parsed;
      }
      const r = await importBase({ root, disk: flags.disk, diskFormat: flags.diskFormat, memory: flags.memory, vm, name: flags.name, progress });
      printResult(g, r, () => `${r.added ? 'imported' : 'already present'}: base ${r.id}`);
    });

  base
    .command('capture')
    .summary('capture a running VM straight into the library as a base')
    .description('The same as `snapshot` into a temporary directory followed by `base import` of it.')
    .option('--instance <id>', 'an instance started by launch/synthesize')
    .option('--qmp <socket>', "any QEMU's QMP unix socket")
    .option('--disk <image>', "the VM's disk image (default: its first drive)")
    .option('--name <name>', 'a name to refer to the base by')
    .addOption(new Option('--then <what>', 'after the capture').choices(['resume', 'quit']).default('resume'))
    .action(async (flags: { instance?: string; qmp?: string; disk?: string; name?: string; then: 'resume' | 'quit' }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const progress = makeProgress(g);
      await mkdir(tmpDir(root), { recursive: true });
      const dir = join(tmpDir(root), `capture-${process.pid}-${Date.now()}`);
      try {
        await snapshotVm({ root, instance: flags.instance, qmp: flags.qmp, disk: flags.disk, outDir: dir, then: flags.then, progress });
        const snap = await readSnapshotDir(dir);
        const r = await importBase({ root, disk: snap.disk, diskFormat: snap.diskFormat, memory: snap.memory, vm: snap.vm, name: flags.name, qemuVersion: snap.qemuVersion, progress });
        printResult(g, r, () => `${r.added ? 'captured' : 'already present'}: base ${r.id}`);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });

  base
    .command('list')
    .summary('list the base VMs in the library (or in Glance: --glance)')
    .option('--glance [url]', 'list the base packages in Glance instead (default endpoint: as for base push)')
    .action(async (f: { glance?: string | true }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      if (f.glance !== undefined) return printGlanceBases(g, f.glance);
      const list = await listBases(libraryRoot(g.library));
      printResult(g, { message_type: 'base_list', bases: list }, () => {
        if (list.length === 0) return `no base VMs in ${libraryRoot(g.library)}`;
        const rows = [['id', 'name', 'machine', 'memory', 'disk', 'stored', 'created']];
        for (const b of list) {
          rows.push([
            b.id.slice(0, 16),
            b.name ?? '',
            b.machine ?? '',
            b.memory_bytes === undefined ? '' : bytes(b.memory_bytes),
            b.disk_bytes === undefined ? '' : bytes(b.disk_bytes),
            bytes(b.stored_bytes),
            b.created_at.slice(0, 19),
          ]);
        }
        return table(rows);
      });
    });

  base
    .command('show')
    .summary('show one base VM: targets, digests, VM spec')
    .argument('<id>', 'base id, unique prefix or name')
    .action(async (ref: string, _f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const m = await showBase(root, await resolveBaseId(root, ref));
      printResult(g, { message_type: 'base_show', ...m }, () => {
        const rows = [['target', 'kind', 'size', 'digest']];
        for (const t of m.targets) rows.push([t.name, t.kind, bytes(t.size), t.digest.slice(0, 16)]);
        const vm = m.vm;
        return [
          `base ${m.id}${m.name ? ` (${m.name})` : ''}`,
          `dir ${m.dir}, ${bytes(m.stored_bytes)} stored, created ${m.created_at}`,
          vm
            ? `vm: ${vm.machine}, ${vm.memoryMiB} MiB, cpu ${vm.cpu ?? 'qemu64'}, smp ${vm.smp ?? 1}` +
              (vm.kernel ? `, direct boot (${vm.append ?? ''})` : '') +
              (vm.network ? `, nic ${vm.network.model ?? 'virtio-net-pci'}` : '')
            : 'vm: no spec (cannot be resumed by synthesize)',
          m.qemu_version ? `captured with QEMU ${m.qemu_version}` : '',
          '',
          table(rows),
        ]
          .filter((l, i) => l !== '' || i === 4)
          .join('\n');
      });
    });

  base
    .command('rm')
    .summary('remove a base VM (refused while a running instance uses it)')
    .argument('<id>', 'base id, unique prefix or name')
    .action(async (ref: string, _f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const id = await resolveBaseId(root, ref);
      await removeBase(root, id);
      printResult(g, { message_type: 'base_rm', id }, () => `removed base ${id}`);
    });

  base
    .command('export')
    .summary('write a base VM as one portable package (tar)')
    .argument('<id>', 'base id, unique prefix or name')
    .requiredOption('-o, --output <file>', 'package file to write')
    .action(async (ref: string, flags: { output: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const r = await exportBase(root, await resolveBaseId(root, ref), flags.output);
      printResult(g, { message_type: 'base_export', ...r }, () => `wrote ${r.path} (${bytes(r.size)})`);
    });

  base
    .command('verify')
    .summary("rehash a base VM's files and check them against its id")
    .argument('<id>', 'base id, unique prefix or name')
    .action(async (ref: string, _f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const root = libraryRoot(g.library);
      const r = await verifyBase(root, await resolveBaseId(root, ref), makeProgress(g));
      if (!r.ok) throw new CorruptInputError(`base ${r.id.slice(0, 12)} is damaged: ${r.problems.join('; ')}`, { problems: r.problems });
      printResult(g, r, () => `base ${r.id}: ok`);
    });

  registerBaseGlance(base);
}
