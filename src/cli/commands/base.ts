import type { Command } from 'commander';
import { Option } from 'commander';
import {
  captureBase,
  gcLibrary,
  exportBase,
  importBaseFrom,
  libraryRoot,
  listBases,
  removeBase,
  showBase,
  verifyBase,
} from '../../api/base.js';
import { CorruptInputError } from '../../util/errors.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';
import { trust, trustOption, type TrustFlags } from '../trust-flags.js';
import { signingKey } from '../../api/keys.js';
import { printGlanceBases, registerBaseGlance } from './base-glance.js';

interface ImportFlags extends TrustFlags {
  disk?: string;
  diskFormat?: string;
  memory?: string;
  vm?: string;
  name?: string;
}

interface CaptureFlags {
  instance?: string;
  qmp?: string;
  disk?: string;
  name?: string;
  then: 'resume' | 'quit';
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

  const importCmd = base
    .command('import')
    .summary('add a base VM: from a snapshot directory, a package, or files')
    .argument('[input]', 'a snapshot directory (from `snapshot`) or a package (from `base export`)')
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
    );
  trustOption(importCmd).action(async (input: string | undefined, flags: ImportFlags, command: Command) => {
    const g = command.optsWithGlobals<GlobalOptions>();
    const r = await importBaseFrom({
      root: libraryRoot(g.library),
      input,
      disk: flags.disk,
      diskFormat: flags.diskFormat,
      memory: flags.memory,
      vmFile: flags.vm,
      name: flags.name,
      progress: makeProgress(g),
      trust: await trust(flags),
    });
    const signed =
      r.signature?.status === 'verified' ? ` (signed by ${r.signature.trusted_as ?? r.signature.signer ?? ''})` : '';
    printResult(g, r, () => `${r.added ? 'imported' : 'already present'}: base ${r.id}${signed}`);
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
    .action(async (flags: CaptureFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await captureBase({
        root: libraryRoot(g.library),
        instance: flags.instance,
        qmp: flags.qmp,
        disk: flags.disk,
        name: flags.name,
        afterCapture: flags.then,
        progress: makeProgress(g),
      });
      printResult(g, r, () => `${r.added ? 'captured' : 'already present'}: base ${r.id}`);
    });

  base
    .command('list')
    .summary('list the base VMs in the library (or in Glance: --glance)')
    .option('--glance [url]', 'list the base packages in Glance instead (default endpoint: as for base push)')
    .action(async (f: { glance?: string | true }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      if (f.glance !== undefined) return printGlanceBases(g, f.glance);
      const r = await listBases(libraryRoot(g.library));
      const list = r.bases;
      printResult(g, r, () => {
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
            b.damaged ? 'DAMAGED (see base verify)' : b.created_at.slice(0, 19),
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
      const m = await showBase(libraryRoot(g.library), ref);
      printResult(g, m, () => {
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
      const r = await removeBase(libraryRoot(g.library), ref);
      printResult(g, r, () => `removed base ${r.id}`);
    });

  base
    .command('export')
    .summary('write a base VM as one portable package (tar)')
    .argument('<id>', 'base id, unique prefix or name')
    .requiredOption('-o, --output <file>', 'package file to write')
    .option('--sign <key>', 'sign the package with this private key (NAME.key from `key generate`)')
    .option('--force', 'replace the package file if it exists')
    .action(async (ref: string, flags: { output: string; sign?: string; force?: boolean }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await exportBase(libraryRoot(g.library), ref, flags.output, {
        sign: await signingKey(flags.sign),
        force: flags.force,
      });
      printResult(g, r, () => `wrote ${r.path} (${bytes(r.size)})${r.signed_by ? ', signed' : ''}`);
    });

  base
    .command('gc')
    .summary('show and remove leftovers of killed runs (temp files, stale locks, unrecorded instances)')
    .option('--dry-run', 'only show what would be removed')
    .option('--instances', 'also remove dead instances (QEMU gone; see ps)')
    .action(async (flags: { dryRun?: boolean; instances?: boolean }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await gcLibrary(libraryRoot(g.library), { dryRun: flags.dryRun, instances: flags.instances });
      printResult(g, r, () => {
        if (r.leftovers.length === 0) return 'nothing to clean up';
        const rows = [['what', 'path', 'size', 'removed']];
        for (const l of r.leftovers) rows.push([l.kind, l.path, bytes(l.bytes), l.removed ? 'yes' : 'no']);
        return `${table(rows)}\n${r.dry_run ? 'would free' : 'freed'} ${bytes(r.bytes)}`;
      });
    });

  base
    .command('verify')
    .summary("rehash a base VM's files and check them against its id")
    .argument('<id>', 'base id, unique prefix or name')
    .action(async (ref: string, _f: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await verifyBase(libraryRoot(g.library), ref, makeProgress(g));
      if (!r.ok) {
        const why = r.problems.join('; ');
        throw new CorruptInputError(`base ${r.id.slice(0, 12)} is damaged: ${why}`, { problems: r.problems });
      }
      printResult(g, r, () => `base ${r.id}: ok`);
    });

  registerBaseGlance(base);
}
